// The ops of the `cuda` backend (docs/backends/cuda.md); binding.cpp registers them as
// torch.ops.arcface_kernels_cuda.{partial_stats, grad_chunk, project_rows}.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace arcface_kernels {

// Per-row partial statistics over all classes of w (docs/design.md section 4), walking the
// classes in chunks whose float32 dots fit in workspace_bytes. rx, rw: the inverse norms.
// clip_eps: fallback="clip" with that eps (eq. (3a)), none for the threshold rules. threshold (N,)
// and coeffs (3,), both or neither: the non-target epilogue (docs/design.md section 3c), hard
// non-target entries' logits s h(c) (eq. (N1)).
std::vector<at::Tensor> partial_stats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                                      const at::Tensor& m1, const at::Tensor& m2, const at::Tensor& m3,
                                      const at::Tensor& rx, const at::Tensor& rw, double scale, int64_t sub_centers,
                                      bool easy_margin, std::optional<double> clip_eps,
                                      const std::optional<at::Tensor>& threshold,
                                      const std::optional<at::Tensor>& coeffs, int64_t workspace_bytes);

// Writes into `out` (N x chunk * K, float32, bfloat16 or float16, columns contiguous, rows any
// stride >= chunk * K: the chunk plan pads the last chunk's rows) the gradient tile
// G = dcos * rx * rw^T of the weight rows w_rows = w[first_class * K : stop * K], given the final
// log-sum-exp and each row's target dcos (docs/design.md section 5): dcos = s g (p - eps / C) off
// the target, target_dcos on it. threshold, coeffs (both or neither): the non-target epilogue, whose
// hard entries take dcos = s g (p - eps / C) dh/dc with p = exp(s h(c) - lse) (eq. (N2)).
void grad_chunk(const at::Tensor& x, const at::Tensor& w_rows, const at::Tensor& labels, const at::Tensor& rx,
                const at::Tensor& rw_rows, const at::Tensor& lse, const at::Tensor& grad_rows,
                const at::Tensor& target_dcos, at::Tensor& out, int64_t first_class, double scale,
                int64_t sub_centers, double smoothing_per_class, const std::optional<at::Tensor>& threshold,
                const std::optional<at::Tensor>& coeffs);

// out = grad - (u . grad) u per row, u = factor * v the unit row (docs/design.md eqs. (23)-(24b):
// the dW and dX projections of the chunked backward), computed in float32 and rounded once into
// out's dtype (inf where it overflows). grad: float32 (rows, D); v, out: (rows, D) in float32,
// bfloat16 or float16, columns contiguous, any row stride; factor: (rows,) float32
// (common.projection_factor: the inverse norm, 0 on rows clamped at eps).
void project_rows(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& factor, at::Tensor& out);

}  // namespace arcface_kernels
