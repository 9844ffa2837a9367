// The `cuda` backend's part of the shared chunked backward (arcface_kernels/backends/chunk_plan.py,
// docs/design.md section 5): `grad_chunk` writes one class chunk's gradient tile
// G = dcos * rx * rw^T. A cuBLAS GEMM (through ATen) recomputes the chunk's raw dot products in
// float32, then `gradient_tile` on a rows x class-segments grid turns each entry into dcos (the
// target entry takes the row's target_dcos, computed once per row by the op), routes it to the
// class's winning sub-centre column and writes it in G's dtype, rounded to nearest (inf on
// overflow, never clamped). The driver then runs the dX / dW GEMMs on G.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "chunking.h"
#include "ops.h"

namespace arcface_kernels {
namespace {

template <typename GradT>
__global__ void gradient_tile(const float* __restrict__ dots, const float* __restrict__ rw_chunk, RowInputs in,
                              GradT* __restrict__ grad, int64_t first_class, int64_t chunk_classes, int k_count,
                              LossSettings loss) {
  const int64_t row = blockIdx.x;
  const int64_t width = chunk_classes * k_count;
  const float* row_dots = dots + row * width;
  GradT* row_grad = grad + row * width;
  const float rx = in.rx[row];
  const RowTerms terms = load_row(in, row);
  const int64_t target = chunk_target(in, row, first_class, chunk_classes);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; j < chunk_classes; j += stride) {
    int pick;
    const float c = class_cosine(row_dots, rw_chunk, rx, j, k_count, &pick);
    const float dcos = entry_cosine_gradient(c, j == target, terms, loss);
    for (int k = 0; k < k_count; ++k) {
      const int64_t col = j * k_count + k;
      row_grad[col] = static_cast<GradT>(k == pick ? dcos * rx * rw_chunk[col] : 0.f);
    }
  }
}

}  // namespace

void grad_chunk(const at::Tensor& x_in, const at::Tensor& w_rows_in, const at::Tensor& labels_in,
                const at::Tensor& rx_in, const at::Tensor& rw_rows_in, const at::Tensor& lse_in,
                const at::Tensor& grad_rows_in, const at::Tensor& target_dcos_in, at::Tensor& out, int64_t first_class,
                double scale, int64_t sub_centers, double smoothing_per_class) {
  check_inputs(x_in, w_rows_in, labels_in, sub_centers);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), w_rows = w_rows_in.contiguous(), labels = labels_in.contiguous();
  const int64_t n = x.size(0), width = w_rows.size(0), chunk_classes = width / sub_centers;
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.dim() == 2 && out.size(0) == n && out.size(1) == width,
              "cuda backend: grad_chunk's out must be a contiguous (N, chunk * K) tensor");
  const auto rx = row_vector(rx_in, n, "rx"), rw_rows = row_vector(rw_rows_in, width, "rw_rows");
  const auto lse = row_vector(lse_in, n, "lse"), grad_rows = row_vector(grad_rows_in, n, "grad_rows");
  const auto target_dcos = row_vector(target_dcos_in, n, "target_dcos");
  if (n == 0 || width == 0) return;
  auto dots = at::empty({n, width}, x.options().dtype(at::kFloat));
  chunk_dots(x, w_rows, dots);
  const RowInputs in{labels.data_ptr<int64_t>(), rx.data_ptr<float>(),    nullptr,
                     nullptr,                     nullptr,                lse.data_ptr<float>(),
                     grad_rows.data_ptr<float>(), target_dcos.data_ptr<float>()};
  const LossSettings loss{static_cast<float>(scale), static_cast<float>(smoothing_per_class), false};
  const int64_t blocks_per_row = std::min<int64_t>((chunk_classes + kThreads - 1) / kThreads, 65535);
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(blocks_per_row));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto* grad) {
    gradient_tile<<<grid, kThreads, 0, stream>>>(dots.data_ptr<float>(), rw_rows.data_ptr<float>(), in, grad,
                                                 first_class, chunk_classes, static_cast<int>(sub_centers), loss);
  };
  switch (out.scalar_type()) {
    case at::kFloat: launch(out.data_ptr<float>()); break;
    case at::kBFloat16: launch(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: launch(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "cuda backend: grad_chunk writes float32, bfloat16 or float16 tiles");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace arcface_kernels
