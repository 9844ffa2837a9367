// The two ops of the `cuda` backend (docs/backends/cuda.md); binding.cpp registers them as
// torch.ops.arcface_kernels_cuda.{partial_stats, backward}.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace arcface_kernels {

// Per-row partial statistics over all classes of w (docs/design.md section 4).
std::vector<at::Tensor> partial_stats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                                      const at::Tensor& m1, const at::Tensor& m2, const at::Tensor& m3,
                                      double scale, int64_t sub_centers, bool easy_margin);

// (dX float32, dW in w's dtype) given the final log-sum-exp (docs/design.md section 5).
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w,
                                            const at::Tensor& labels, const at::Tensor& m1, const at::Tensor& m2,
                                            const at::Tensor& m3, const at::Tensor& lse, double scale,
                                            int64_t sub_centers, bool easy_margin, bool straight_through,
                                            double label_smoothing, int64_t num_classes);

}  // namespace arcface_kernels
