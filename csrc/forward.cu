// Forward of the `cuda` backend: per class chunk, a cuBLAS GEMM (through ATen) to float32 dot
// products, then the forward epilogue merges the chunk into each row's statistics
// (docs/design.md section 4).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "chunking.h"
#include "ops.h"

namespace arcface_kernels {
namespace {

// Forward: merge one chunk's statistics into each row's running (max, sum-exp), logit sum,
// target terms and best class (docs/design.md section 4).
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

}  // namespace

std::vector<at::Tensor> partial_stats(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
                                      const at::Tensor& m1_in, const at::Tensor& m2_in, const at::Tensor& m3_in,
                                      double scale, int64_t sub_centers, bool easy_margin) {
  check_inputs(x_in, w_in, labels_in, sub_centers);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  const auto m1 = m1_in.to(at::kFloat).contiguous(), m2 = m2_in.to(at::kFloat).contiguous(),
             m3 = m3_in.to(at::kFloat).contiguous();
  const int64_t n = x.size(0), n_classes = w.size(0) / sub_centers;
  const auto f32 = x.options().dtype(at::kFloat);
  const auto rx = inverse_norms(x), rw = inverse_norms(w);
  auto row_max = at::full({n}, -std::numeric_limits<float>::infinity(), f32);
  auto sum_exp = at::zeros({n}, f32), logit_sum = at::zeros({n}, f32);
  auto target_logit = at::zeros({n}, f32), target_cos = at::zeros({n}, f32);
  auto best_cos = at::full({n}, -std::numeric_limits<float>::infinity(), f32);
  auto best_class = at::zeros({n}, x.options().dtype(at::kLong));
  const RowStats stats{row_max.data_ptr<float>(), sum_exp.data_ptr<float>(), logit_sum.data_ptr<float>(),
                       target_logit.data_ptr<float>(), target_cos.data_ptr<float>(), best_cos.data_ptr<float>(),
                       best_class.data_ptr<int64_t>()};
  const int64_t chunk = classes_per_chunk(n, sub_centers, n_classes);
  auto buffer = at::empty({n * chunk * sub_centers}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < n_classes; start += chunk) {
    const int64_t count = std::min(chunk, n_classes - start);
    auto dots = flat_view(buffer, n, count * sub_centers);
    chunk_dots(x, w.narrow(0, start * sub_centers, count * sub_centers), dots);
    if (n == 0) continue;
    forward_epilogue<<<n, kThreads, 0, stream>>>(
        dots.data_ptr<float>(), rx.data_ptr<float>(), rw.data_ptr<float>() + start * sub_centers,
        labels.data_ptr<int64_t>(), margins_of(m1, m2, m3), stats, start, count, static_cast<int>(sub_centers),
        static_cast<float>(scale), easy_margin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {row_max, sum_exp, target_logit, logit_sum, target_cos, best_cos, best_class};
}

}  // namespace arcface_kernels
