// Epilogue kernels run on a class chunk's raw dot products (N x chunk*K, float32), one thread
// block per row. Reductions use a fixed tree, so results are bit-reproducible.
#pragma once

#include <c10/util/BFloat16.h>

#include <cfloat>
#include <cstdint>

#include "margin_math.cuh"

namespace arcface_kernels {

constexpr int kThreads = 256;

struct RowMargins {
  const float* m1;
  const float* m2;
  const float* m3;
};

// (value, index) with the larger value winning, the lower index on ties.
struct Best {
  float value;
  int64_t index;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

template <typename T, typename Op>
__device__ T block_reduce(T value, Op op, T* scratch) {
  // scratch holds kThreads values; a fixed halving tree
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + stride]);
    __syncthreads();
  }
  T result = scratch[0];
  __syncthreads();
  return result;
}

// Cosine of class j of a row: the max over its sub-centre columns, and the winning k.
__device__ __forceinline__ float class_cosine(const float* dots, const float* rw, float rx, int64_t j, int k_count,
                                              int* pick) {
  float best = dots[j * k_count] * rx * rw[j * k_count];
  *pick = 0;
  for (int k = 1; k < k_count; ++k) {
    const float c = dots[j * k_count + k] * rx * rw[j * k_count + k];
    if (c > best) {
      best = c;
      *pick = k;
    }
  }
  return best;
}

struct RowStats {
  float* row_max;
  float* sum_exp;
  float* logit_sum;
  float* target_logit;
  float* target_cos;
  float* best_cos;
  int64_t* best_class;
};

// Forward: merge one chunk's statistics into each row's running (max, sum-exp), logit sum,
// target terms and best class (DESIGN.md section 3).
__global__ void forward_epilogue(const float* __restrict__ dots, const float* __restrict__ rx,
                                 const float* __restrict__ rw_chunk, const int64_t* __restrict__ labels,
                                 RowMargins margins, RowStats stats, int64_t chunk_start, int64_t chunk_classes,
                                 int k_count, float scale, bool easy_margin) {
  __shared__ float scratch_f[kThreads];
  __shared__ Best scratch_b[kThreads];
  const int64_t row = blockIdx.x;
  const float* row_dots = dots + row * chunk_classes * k_count;
  const float x_inv = rx[row];
  const int64_t target = labels[row] - chunk_start;  // in [0, chunk_classes) when this chunk holds it
  const bool has_target = labels[row] >= 0 && target >= 0 && target < chunk_classes;
  const float m1 = margins.m1[row], m2 = margins.m2[row], m3 = margins.m3[row];
  float target_value = 0.f;
  if (has_target) {
    int pick;
    target_value = class_cosine(row_dots, rw_chunk, x_inv, target, k_count, &pick);
  }
  const float target_z = scale * phi(target_value, m1, m2, m3, easy_margin);

  float local_max = -INFINITY, local_sum = 0.f;
  Best local_best{-INFINITY, 0};
  for (int64_t j = threadIdx.x; j < chunk_classes; j += kThreads) {
    int pick;
    const float c = class_cosine(row_dots, rw_chunk, x_inv, j, k_count, &pick);
    const float z = (has_target && j == target) ? target_z : scale * c;
    local_max = fmaxf(local_max, z);
    local_sum += z;
    local_best = better(local_best, Best{c, chunk_start + j});
  }
  const float chunk_max = block_reduce(local_max, [](float a, float b) { return fmaxf(a, b); }, scratch_f);
  const float chunk_logit_sum = block_reduce(local_sum, [](float a, float b) { return a + b; }, scratch_f);
  const Best chunk_best = block_reduce(local_best, better, scratch_b);
  float local_exp = 0.f;
  for (int64_t j = threadIdx.x; j < chunk_classes; j += kThreads) {
    int pick;
    const float c = class_cosine(row_dots, rw_chunk, x_inv, j, k_count, &pick);
    const float z = (has_target && j == target) ? target_z : scale * c;
    local_exp += expf(z - chunk_max);
  }
  const float chunk_sum_exp = block_reduce(local_exp, [](float a, float b) { return a + b; }, scratch_f);
  if (threadIdx.x == 0) {
    const float old_max = stats.row_max[row];
    const float new_max = fmaxf(old_max, chunk_max);
    stats.sum_exp[row] = stats.sum_exp[row] * expf(old_max - new_max) + chunk_sum_exp * expf(chunk_max - new_max);
    stats.row_max[row] = new_max;
    stats.logit_sum[row] += chunk_logit_sum;
    if (has_target) {
      stats.target_logit[row] = target_z;
      stats.target_cos[row] = target_value;
    }
    if (chunk_best.value > stats.best_cos[row]) {  // strict: earlier chunks win ties
      stats.best_cos[row] = chunk_best.value;
      stats.best_class[row] = chunk_best.index;
    }
  }
}

struct GradientInputs {
  const float* lse;
  const float* grad_rows;  // 0 on ignored rows
  const int64_t* labels;
  RowMargins margins;
};

// Backward: for each entry of the chunk, dcos (DESIGN.md section 3, the target through expm1
// and dphi/dc), routed to the winning sub-centre column. Writes the GEMM operand
// G = dcos * rx * rw (type GradT) and, over the raw dots in place, dcos * cos for the
// normalization terms.
template <typename GradT>
__global__ void backward_epilogue(float* __restrict__ dots, GradT* __restrict__ grad_tile,
                                  const float* __restrict__ rx, const float* __restrict__ rw_chunk,
                                  GradientInputs in, int64_t chunk_start, int64_t chunk_classes, int k_count,
                                  float scale, float smoothing, float smoothing_per_class, bool easy_margin,
                                  bool straight_through) {
  const int64_t row = blockIdx.x;
  const int64_t width = chunk_classes * k_count;
  float* row_dots = dots + row * width;
  GradT* row_grad = grad_tile + row * width;
  const float x_inv = rx[row];
  const float lse = in.lse[row];
  const float g = in.grad_rows[row];
  const int64_t label = in.labels[row];
  const int64_t target = label - chunk_start;
  const bool has_target = label >= 0 && target >= 0 && target < chunk_classes;
  const float m1 = in.margins.m1[row], m2 = in.margins.m2[row], m3 = in.margins.m3[row];
  for (int64_t j = threadIdx.x; j < chunk_classes; j += kThreads) {
    int pick;
    const float c = class_cosine(row_dots, rw_chunk, x_inv, j, k_count, &pick);
    float dz;
    if (has_target && j == target) {
      const float target_z = scale * phi(c, m1, m2, m3, easy_margin);
      dz = (expm1f(target_z - lse) + smoothing - smoothing_per_class) *
           dphi_dcos(c, m1, m2, easy_margin, straight_through);
    } else {
      dz = expf(scale * c - lse) - smoothing_per_class;
    }
    const float dcos = scale * g * dz;
    for (int k = 0; k < k_count; ++k) {
      const int64_t col = j * k_count + k;
      const float routed = (k == pick) ? dcos : 0.f;
      row_grad[col] = static_cast<GradT>(routed * x_inv * rw_chunk[col]);
      row_dots[col] = routed * c;  // the winning column's cosine is c
    }
  }
}

}  // namespace arcface_kernels
