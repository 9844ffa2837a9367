// Backward of the `cuda` backend: per class chunk, recompute the dot products, the backward
// epilogue turns them into the gradient tile G, and two GEMMs accumulate dX and write dW
// (docs/design.md section 5).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

#include "chunking.h"
#include "ops.h"

namespace arcface_kernels {
namespace {

// Backward: for each entry of the chunk, dcos (docs/design.md section 5, the target through expm1
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_rows_in, const at::Tensor& x_in,
                                            const at::Tensor& w_in, const at::Tensor& labels_in,
                                            const at::Tensor& m1_in, const at::Tensor& m2_in,
                                            const at::Tensor& m3_in, const at::Tensor& lse_in, double scale,
                                            int64_t sub_centers, bool easy_margin, bool straight_through,
                                            double label_smoothing, int64_t num_classes) {
  check_inputs(x_in, w_in, labels_in, sub_centers);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), w = w_in.contiguous(), labels = labels_in.contiguous();
  const auto m1 = m1_in.to(at::kFloat).contiguous(), m2 = m2_in.to(at::kFloat).contiguous(),
             m3 = m3_in.to(at::kFloat).contiguous();
  const auto grad_rows = grad_rows_in.to(at::kFloat).contiguous(), lse = lse_in.to(at::kFloat).contiguous();
  const int64_t n = x.size(0), n_classes = w.size(0) / sub_centers;
  const auto f32 = x.options().dtype(at::kFloat);
  const auto rx = inverse_norms(x), rw = inverse_norms(w);
  // the normalization terms exist only where the norm exceeds eps (as through F.normalize)
  const auto x_term = at::where(rx < 1.f / kNormEps, rx * rx, at::zeros_like(rx));
  const auto w_term = at::where(rw < 1.f / kNormEps, rw * rw, at::zeros_like(rw));
  // bfloat16 gradient tiles feed the tensor cores; float16 could overflow (dphi/dc ~ 1/sin theta),
  // so float16 and float32 inputs take float32 tiles and GEMMs (tf32 where torch allows it)
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto grad_type = bf16 ? at::kBFloat16 : at::kFloat;
  const auto x_operand = bf16 ? x : x.to(at::kFloat);
  const auto x_float = x.to(at::kFloat);
  auto dx = at::zeros({n, x.size(1)}, f32);
  auto row_sum = at::zeros({n}, f32);
  auto dw = at::empty_like(w);
  const int64_t chunk = classes_per_chunk(n, sub_centers, n_classes);
  auto buffer = at::empty({n * chunk * sub_centers}, f32);
  auto grad_buffer = at::empty({n * chunk * sub_centers}, x.options().dtype(grad_type));
  const GradientInputs inputs{lse.data_ptr<float>(), grad_rows.data_ptr<float>(), labels.data_ptr<int64_t>(),
                              margins_of(m1, m2, m3)};
  const float smoothing_per_class = static_cast<float>(label_smoothing / static_cast<double>(num_classes));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < n_classes; start += chunk) {
    const int64_t count = std::min(chunk, n_classes - start);
    const int64_t width = count * sub_centers;
    const auto w_rows = w.narrow(0, start * sub_centers, width);
    auto dots = flat_view(buffer, n, width);
    auto grad_tile = flat_view(grad_buffer, n, width);
    chunk_dots(x, w_rows, dots);
    if (n > 0) {
      const float* rw_chunk = rw.data_ptr<float>() + start * sub_centers;
      if (bf16) {
        backward_epilogue<c10::BFloat16><<<n, kThreads, 0, stream>>>(
            dots.data_ptr<float>(), grad_tile.data_ptr<c10::BFloat16>(), rx.data_ptr<float>(), rw_chunk, inputs,
            start, count, static_cast<int>(sub_centers), static_cast<float>(scale),
            static_cast<float>(label_smoothing), smoothing_per_class, easy_margin, straight_through);
      } else {
        backward_epilogue<float><<<n, kThreads, 0, stream>>>(
            dots.data_ptr<float>(), grad_tile.data_ptr<float>(), rx.data_ptr<float>(), rw_chunk, inputs, start,
            count, static_cast<int>(sub_centers), static_cast<float>(scale), static_cast<float>(label_smoothing),
            smoothing_per_class, easy_margin, straight_through);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // dots now hold dcos * cos: its row and column sums give the normalization terms
    row_sum += dots.sum(1);
    const auto col_sum = dots.sum(0);
    const auto w_operand = bf16 ? w_rows : w_rows.to(at::kFloat);
    // dX += G W_chunk with float32 accumulation across chunks
    dx += bf16 ? at::mm(grad_tile, w_operand, at::kFloat) : at::mm(grad_tile, w_operand);
    auto dw_rows = bf16 ? at::mm(grad_tile.t(), x_operand, at::kFloat) : at::mm(grad_tile.t(), x_operand);
    dw_rows -= (w_term.narrow(0, start * sub_centers, width) * col_sum).unsqueeze(1) * w_rows.to(at::kFloat);
    dw.narrow(0, start * sub_centers, width).copy_(saturating_cast(dw_rows, w.scalar_type()));
  }
  dx -= (x_term * row_sum).unsqueeze(1) * x_float;
  return {dx, dw};
}

}  // namespace arcface_kernels
