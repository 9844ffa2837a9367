// The `cuda` backend: cuBLAS GEMMs on class chunks (through ATen) with fused epilogue kernels.
// The chunk's N x chunk workspace is bounded (kWorkspaceBytes), never N x C (DESIGN.md section 3).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "epilogues.cuh"

namespace arcface_kernels {
namespace {

// Bound on one float32 chunk tile (N x chunk * K); backward holds it and the gradient tile.
constexpr int64_t kWorkspaceBytes = 64ll << 20;

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t sub_centers) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && labels.is_cuda(), "cuda backend: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cuda backend: x (N, D), w (C*K, D)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "cuda backend: x and w must share a dtype");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "cuda backend: float32, float16 or bfloat16 inputs");
  TORCH_CHECK(sub_centers >= 1 && w.size(0) % sub_centers == 0, "cuda backend: sub_centers must divide rows");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.numel() == x.size(0), "cuda backend: labels (N,) int64");
}

// 1 / max(|v_i|, eps), upcasting a slice of rows at a time: a float32 copy of a bf16 weight with
// millions of rows would be larger than the whole workspace.
at::Tensor inverse_norms(const at::Tensor& v) {
  constexpr int64_t kSliceBytes = 16ll << 20;
  auto norms = at::empty({v.size(0)}, v.options().dtype(at::kFloat));
  const int64_t step = std::max<int64_t>(1, kSliceBytes / std::max<int64_t>(v.size(1) * 4, 1));
  for (int64_t start = 0; start < v.size(0); start += step) {
    const int64_t count = std::min(step, v.size(0) - start);
    norms.narrow(0, start, count).copy_(at::linalg_vector_norm(v.narrow(0, start, count).to(at::kFloat), 2, {1}));
  }
  return norms.clamp_min_(kNormEps).reciprocal_();
}

int64_t classes_per_chunk(int64_t rows, int64_t sub_centers, int64_t n_classes) {
  const int64_t per_class = std::max<int64_t>(rows, 1) * sub_centers * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(1, std::min(n_classes, kWorkspaceBytes / per_class));
}

// raw dot products of every row with the chunk's weight rows, float32 (out: N x width, contiguous)
void chunk_dots(const at::Tensor& x, const at::Tensor& w_rows, at::Tensor& out) {
  if (x.scalar_type() == at::kFloat) {
    at::mm_out(out, x, w_rows.t());
  } else {
    at::mm_out(out, x, w_rows.t(), at::kFloat);  // fp16/bf16 tensor cores, float32 output
  }
}

at::Tensor flat_view(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

RowMargins margins_of(const at::Tensor& m1, const at::Tensor& m2, const at::Tensor& m3) {
  return RowMargins{m1.data_ptr<float>(), m2.data_ptr<float>(), m3.data_ptr<float>()};
}

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

at::Tensor saturating_cast(const at::Tensor& grad, at::ScalarType dtype) {
  if (dtype == at::kFloat) return grad;
  const double limit = dtype == at::kHalf ? 65504.0 : 3.3895313892515355e38;
  return grad.clamp(-limit, limit).to(dtype);
}

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

}  // namespace

TORCH_LIBRARY(arcface_kernels_cuda, m) {
  m.def("partial_stats(Tensor x, Tensor w, Tensor labels, Tensor m1, Tensor m2, Tensor m3, float scale, "
        "int sub_centers, bool easy_margin) -> Tensor[]");
  m.def("backward(Tensor grad_rows, Tensor x, Tensor w, Tensor labels, Tensor m1, Tensor m2, Tensor m3, "
        "Tensor lse, float scale, int sub_centers, bool easy_margin, bool straight_through, "
        "float label_smoothing, int num_classes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(arcface_kernels_cuda, CUDA, m) {
  m.impl("partial_stats", &partial_stats);
  m.impl("backward", &backward);
}

}  // namespace arcface_kernels
