// Forward of the `cuda` backend: per class chunk, a cuBLAS GEMM (through ATen) to float32 dot
// products, then two epilogue kernels fold the chunk into each row's statistics
// (docs/design.md section 4): `segment_stats` on a rows x class-segments grid writes one
// RowPartial per (row, segment); `merge_segments` merges them, in segment order, into the row's
// running statistics and records the target terms. Both are templates on the target's rule (the
// clip) and segment_stats on the non-target epilogue (docs/backends/cuda.md).
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

// Running per-row statistics (contract.PartialStats), device pointers.
struct RowStats {
  float* row_max;
  float* sum_exp;
  float* nontarget_sum_exp;
  float* logit_sum;
  float* target_logit;
  float* target_cos;
  float* best_cos;
  int64_t* best_class;
};

// kClip: fallback="clip" (phi<true>); kNegatives: the non-target epilogue (hard non-target
// entries get s h(c), eq. (N1); the best class stays on the plain cosines). The plain path,
// <false, false>, compiles to the code it had before either flag.
template <bool kClip, bool kNegatives>
__global__ void segment_stats(const float* __restrict__ dots, const float* __restrict__ rw_chunk, RowInputs in,
                              RowPartial* __restrict__ partials, int64_t first_class, int64_t chunk_classes,
                              int k_count, LossSettings loss, NegativeInputs negatives, float clip_eps) {
  __shared__ RowPartial scratch[kThreads];
  const int64_t row = blockIdx.x;
  const Segment segment = block_segment(chunk_classes);
  const float* row_dots = dots + row * chunk_classes * k_count;
  const float rx = in.rx[row];
  const RowTerms terms = load_row(in, row);
  const int64_t target = chunk_target(in, row, first_class, chunk_classes);
  RowNegatives hard{};
  if constexpr (kNegatives) hard = load_negatives(negatives, row);
  RowPartial partial = empty_partial();
  for (int64_t j = segment.first + threadIdx.x; j < segment.stop; j += kThreads) {
    int pick;
    const float c = class_cosine(row_dots, rw_chunk, rx, j, k_count, &pick);
    float z;
    if constexpr (kNegatives) {
      z = remapped_logit<kClip>(c, j == target, terms, loss, hard, clip_eps);
    } else {
      z = entry_logit<kClip>(c, j == target, terms, loss, clip_eps);
    }
    add_entry(partial, z, c, first_class + j, j == target);
  }
  partial = block_reduce(partial, [](const RowPartial& a, const RowPartial& b) { return merge(a, b); }, scratch);
  if (threadIdx.x == 0) partials[row * gridDim.y + blockIdx.y] = partial;
}

template <bool kClip>
__global__ void merge_segments(const RowPartial* __restrict__ partials, int64_t segments,
                               const float* __restrict__ dots, const float* __restrict__ rw_chunk, RowInputs in,
                               RowStats stats, int64_t rows, int64_t first_class, int64_t chunk_classes,
                               int k_count, LossSettings loss, float clip_eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  RowPartial total{stats.row_max[row],  stats.sum_exp[row],  stats.nontarget_sum_exp[row],
                   stats.logit_sum[row], stats.best_cos[row], stats.best_class[row]};
  for (int64_t s = 0; s < segments; ++s) total = merge(total, partials[row * segments + s]);
  stats.row_max[row] = total.max;
  stats.sum_exp[row] = total.sum_exp;
  stats.nontarget_sum_exp[row] = total.nontarget_sum_exp;
  stats.logit_sum[row] = total.logit_sum;
  stats.best_cos[row] = total.best_cos;
  stats.best_class[row] = total.best_class;
  const int64_t target = chunk_target(in, row, first_class, chunk_classes);
  if (target >= 0) {
    int pick;
    const float c = class_cosine(dots + row * chunk_classes * k_count, rw_chunk, in.rx[row], target, k_count, &pick);
    stats.target_cos[row] = c;
    stats.target_logit[row] = entry_logit<kClip>(c, true, load_row(in, row), loss, clip_eps);
  }
}

}  // namespace

std::vector<at::Tensor> partial_stats(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
                                      const at::Tensor& m1_in, const at::Tensor& m2_in, const at::Tensor& m3_in,
                                      const at::Tensor& rx_in, const at::Tensor& rw_in, double scale,
                                      int64_t sub_centers, bool easy_margin, std::optional<double> clip_eps,
                                      const std::optional<at::Tensor>& threshold_in,
                                      const std::optional<at::Tensor>& coeffs_in, int64_t workspace_bytes) {
  check_inputs(x_in, w_in, labels_in, sub_centers);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  const int64_t n = x.size(0), n_classes = w.size(0) / sub_centers;
  const auto m1 = row_vector(m1_in, n, "m1"), m2 = row_vector(m2_in, n, "m2"), m3 = row_vector(m3_in, n, "m3");
  const auto rx = row_vector(rx_in, n, "rx"), rw = row_vector(rw_in, w.size(0), "rw");
  const auto f32 = x.options().dtype(at::kFloat);
  const float inf = std::numeric_limits<float>::infinity();
  auto row_max = at::full({n}, -inf, f32), sum_exp = at::zeros({n}, f32), logit_sum = at::zeros({n}, f32);
  auto nontarget_sum_exp = at::zeros({n}, f32);
  auto target_logit = at::zeros({n}, f32), target_cos = at::zeros({n}, f32), best_cos = at::full({n}, -inf, f32);
  auto best_class = at::zeros({n}, x.options().dtype(at::kLong));
  const RowStats stats{row_max.data_ptr<float>(),      sum_exp.data_ptr<float>(),
                       nontarget_sum_exp.data_ptr<float>(), logit_sum.data_ptr<float>(),
                       target_logit.data_ptr<float>(), target_cos.data_ptr<float>(), best_cos.data_ptr<float>(),
                       best_class.data_ptr<int64_t>()};
  const RowInputs in{labels.data_ptr<int64_t>(), rx.data_ptr<float>(), m1.data_ptr<float>(), m2.data_ptr<float>(),
                     m3.data_ptr<float>(), nullptr, nullptr, nullptr};
  const LossSettings loss{static_cast<float>(scale), 0.f, easy_margin};
  const float clip = static_cast<float>(clip_eps.value_or(0.));  // read by the kClip kernels only
  at::Tensor threshold, coeffs;  // kept alive across the launches
  const NegativeInputs negatives = negative_inputs(threshold_in, coeffs_in, n, threshold, coeffs);
  const int64_t chunk = classes_per_chunk(n, sub_centers, n_classes, workspace_bytes);
  auto buffer = at::empty({n * chunk * sub_centers}, f32);
  // one RowPartial (24 bytes) per row and segment, as raw bytes
  const int64_t most_segments = segments_per_row(n, chunk);
  auto partials =
      at::empty({n * most_segments * static_cast<int64_t>(sizeof(RowPartial))}, x.options().dtype(at::kByte));
  auto* partial_rows = reinterpret_cast<RowPartial*>(partials.data_ptr<uint8_t>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool clipped = clip_eps.has_value(), negated = negatives.threshold != nullptr;
  const auto segment_kernel = clipped ? (negated ? segment_stats<true, true> : segment_stats<true, false>)
                                   : (negated ? segment_stats<false, true> : segment_stats<false, false>);
  const auto merge_kernel = clipped ? merge_segments<true> : merge_segments<false>;
  for (int64_t first = 0; first < n_classes && n > 0; first += chunk) {
    const int64_t count = std::min(chunk, n_classes - first);
    auto dots = flat_view(buffer, n, count * sub_centers);
    chunk_dots(x, w.narrow(0, first * sub_centers, count * sub_centers), dots);
    const float* rw_chunk = rw.data_ptr<float>() + first * sub_centers;
    const int64_t segments = segments_per_row(n, count);
    segment_kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(segments)), kThreads, 0, stream>>>(
        dots.data_ptr<float>(), rw_chunk, in, partial_rows, first, count, static_cast<int>(sub_centers), loss,
        negatives, clip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        partial_rows, segments, dots.data_ptr<float>(), rw_chunk, in, stats, n, first, count,
        static_cast<int>(sub_centers), loss, clip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {row_max, sum_exp, target_logit, logit_sum, target_cos, best_cos, best_class, nontarget_sum_exp};
}

}  // namespace arcface_kernels
