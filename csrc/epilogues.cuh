// Device helpers of the epilogue kernels (forward.cu, backward.cu), which run on a class chunk's
// raw dot products (N x chunk*K, float32), one thread block per row. Reductions use a fixed
// tree, so results are bit-reproducible.
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

struct GradientInputs {
  const float* lse;
  const float* grad_rows;  // 0 on ignored rows
  const int64_t* labels;
  RowMargins margins;
};

}  // namespace arcface_kernels
