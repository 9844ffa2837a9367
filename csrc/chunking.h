// Host-side helpers shared by forward.cu and backward.cu: input checks, inverse norms, chunk
// sizing and the chunk GEMM. The chunk's N x chunk workspace is bounded (kWorkspaceBytes), never
// N x C (docs/design.md section 7).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "epilogues.cuh"

namespace arcface_kernels {

// Bound on one float32 chunk tile (N x chunk * K); backward holds it and the gradient tile.
constexpr int64_t kWorkspaceBytes = 64ll << 20;

inline void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t sub_centers) {
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
inline at::Tensor inverse_norms(const at::Tensor& v) {
  constexpr int64_t kSliceBytes = 16ll << 20;
  auto norms = at::empty({v.size(0)}, v.options().dtype(at::kFloat));
  const int64_t step = std::max<int64_t>(1, kSliceBytes / std::max<int64_t>(v.size(1) * 4, 1));
  for (int64_t start = 0; start < v.size(0); start += step) {
    const int64_t count = std::min(step, v.size(0) - start);
    norms.narrow(0, start, count).copy_(at::linalg_vector_norm(v.narrow(0, start, count).to(at::kFloat), 2, {1}));
  }
  return norms.clamp_min_(kNormEps).reciprocal_();
}

inline int64_t classes_per_chunk(int64_t rows, int64_t sub_centers, int64_t n_classes) {
  const int64_t per_class = std::max<int64_t>(rows, 1) * sub_centers * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(1, std::min(n_classes, kWorkspaceBytes / per_class));
}

// raw dot products of every row with the chunk's weight rows, float32 (out: N x width, contiguous)
inline void chunk_dots(const at::Tensor& x, const at::Tensor& w_rows, at::Tensor& out) {
  if (x.scalar_type() == at::kFloat) {
    at::mm_out(out, x, w_rows.t());
  } else {
    at::mm_out(out, x, w_rows.t(), at::kFloat);  // fp16/bf16 tensor cores, float32 output
  }
}

inline at::Tensor flat_view(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

inline RowMargins margins_of(const at::Tensor& m1, const at::Tensor& m2, const at::Tensor& m3) {
  return RowMargins{m1.data_ptr<float>(), m2.data_ptr<float>(), m3.data_ptr<float>()};
}

inline at::Tensor saturating_cast(const at::Tensor& grad, at::ScalarType dtype) {
  if (dtype == at::kFloat) return grad;
  const double limit = dtype == at::kHalf ? 65504.0 : 3.3895313892515355e38;
  return grad.clamp(-limit, limit).to(dtype);
}

}  // namespace arcface_kernels
