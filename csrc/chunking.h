// Host-side helpers shared by forward.cu and backward.cu: input checks, chunk sizing (chunk_size.h), the
// chunk GEMM and the epilogues' launch shape. A chunk's N x chunk * K float32 tile is bounded by the
// workspace budget the caller passes (backends.common.get_workspace_budget), never N x C.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>

#include "chunk_size.h"
#include "epilogues.cuh"

namespace arcface_kernels {

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

// A float32 (N,) or (rows,) vector on the device, contiguous (margins, norms, lse, grad_rows).
inline at::Tensor row_vector(const at::Tensor& v, int64_t length, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == length, "cuda backend: ", name, " must have shape (", length, ",)");
  return v.to(at::kFloat).contiguous();
}

// Raw dot products of every row with the chunk's weight rows, float32 (out: N x width, contiguous):
// fp16/bf16 on the tensor cores with float32 output (s = 64 would turn a bf16-rounded cosine into
// a 0.25 logit error).
inline void chunk_dots(const at::Tensor& x, const at::Tensor& w_rows, at::Tensor& out) {
  if (x.scalar_type() == at::kFloat) {
    at::mm_out(out, x, w_rows.t());
  } else {
    at::mm_out(out, x, w_rows.t(), at::kFloat);
  }
}

// Class segments per row for the epilogues' 2-D grid: enough blocks for a few full waves of the
// GPU (8 resident 256-thread blocks per SM) when N is small, at least 4 classes per thread.
inline int64_t segments_per_row(int64_t rows, int64_t chunk_classes) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t wanted = (8 * sms + std::max<int64_t>(rows, 1) - 1) / std::max<int64_t>(rows, 1);
  const int64_t widest = (chunk_classes + 4 * kThreads - 1) / (4 * kThreads);
  return std::max<int64_t>(1, std::min<int64_t>({wanted, widest, 65535}));
}

// The non-target epilogue's device pointers (NegativeInputs, null without one): threshold (N,)
// and coeffs (3,) as float32 and contiguous, kept alive in threshold_out and coeffs_out for the
// launches. Both or neither.
inline NegativeInputs negative_inputs(const std::optional<at::Tensor>& threshold,
                                      const std::optional<at::Tensor>& coeffs, int64_t rows,
                                      at::Tensor& threshold_out, at::Tensor& coeffs_out) {
  TORCH_CHECK(threshold.has_value() == coeffs.has_value(),
              "cuda backend: the non-target epilogue takes both threshold and coeffs");
  if (!threshold.has_value()) return NegativeInputs{nullptr, nullptr};
  TORCH_CHECK(threshold->is_cuda() && coeffs->is_cuda(), "cuda backend: threshold and coeffs must be on a GPU");
  threshold_out = row_vector(*threshold, rows, "threshold");
  coeffs_out = row_vector(*coeffs, 3, "coeffs");
  return NegativeInputs{threshold_out.data_ptr<float>(), coeffs_out.data_ptr<float>()};
}

inline at::Tensor flat_view(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace arcface_kernels
