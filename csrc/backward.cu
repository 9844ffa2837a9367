// The `cuda` backend's part of the shared chunked backward (arcface_kernels/backends/chunk_plan.py,
// docs/design.md section 5).
// - `grad_chunk` writes one class chunk's gradient tile G = dcos * rx * rw^T. A cuBLAS GEMM (through
//   ATen) recomputes the chunk's raw dot products in float32, then `gradient_tile` on a rows x
//   class-segments grid turns each entry into dcos (the target entry takes the row's target_dcos,
//   computed once per row by the op), routes it to the class's winning sub-centre column and writes
//   it in G's dtype, rounded to nearest (inf on overflow, never clamped), several classes per thread.
// - `project_rows` is the plan's tangent projection (dW_c of each chunk, dX at the end) in one kernel.
// The driver runs the dX / dW GEMMs on G.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "chunking.h"
#include "ops.h"

namespace arcface_kernels {
namespace {

// gradient_tile: each thread writes the entries of kEntriesPerThread consecutive classes.
constexpr int kEntriesPerThread = 4;

// `count` consecutive values as one vector access (the address aligned to the whole pack).
template <typename T, int count>
struct alignas(sizeof(T) * count) Pack {
  T v[count];
};

// The raw bits of a 16- or 32-bit value.
template <typename T>
__device__ __forceinline__ uint32_t bits(T value) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16- or 32-bit values");
  if constexpr (sizeof(T) == 2) {
    uint16_t b;
    memcpy(&b, &value, 2);
    return b;
  } else {
    uint32_t b;
    memcpy(&b, &value, 4);
    return b;
  }
}

// Stores a pack with one vector store instruction (__stwb: st.global.wb.v2/v4; a plain store of
// the pack, or of a uint2 / uint4, is split into narrower stores where the values come out of
// branches, as in gradient_tile).
template <typename T, int count>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, count>& pack) {
  if constexpr (count == 1) {
    *p = pack.v[0];
  } else if constexpr (sizeof(T) == 2 && count == 4) {
    __stwb(reinterpret_cast<uint2*>(p), make_uint2(bits(pack.v[0]) | bits(pack.v[1]) << 16,
                                                   bits(pack.v[2]) | bits(pack.v[3]) << 16));
  } else {
    static_assert(sizeof(T) == 4 && count == 4, "packs of 4 16- or 32-bit values");
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(bits(pack.v[0]), bits(pack.v[1]), bits(pack.v[2]), bits(pack.v[3])));
  }
}

// The K columns of class j of a row: its cosine, dcos (the row's target_dcos on the target; with
// kNegatives the hard entries' remapped gradient) and the routed entries (row_math.cuh), written
// in G's dtype, rounded to nearest.
template <bool kNegatives, typename GradT>
__device__ __forceinline__ void class_gradient(const float* row_dots, const float* rw_chunk, float rx, int64_t j,
                                               int k_count, bool is_target, const RowTerms& terms,
                                               const LossSettings& loss, const RowNegatives& hard,
                                               GradT* row_grad) {
  int pick;
  const float c = class_cosine(row_dots, rw_chunk, rx, j, k_count, &pick);
  float dcos;
  if constexpr (kNegatives) {
    dcos = remapped_cosine_gradient(c, is_target, terms, loss, hard);
  } else {
    dcos = entry_cosine_gradient(c, is_target, terms, loss);
  }
  for (int k = 0; k < k_count; ++k) {
    const int64_t col = j * k_count + k;
    row_grad[col] = static_cast<GradT>(routed_gradient(dcos, rx, rw_chunk[col], k, pick));
  }
}

// G of one chunk on a rows x class-segments grid, kEntriesPerThread classes per thread; rows of
// dots and G are dots_stride and grad_stride entries apart. kVector (K = 1, row starts and
// rw_chunk aligned to a group: the host checks): a full group is read with two 16-byte loads and
// written with one store; the math per entry is class_gradient's, on the loaded values (same
// functions, same order: the same bits as the scalar path). kNegatives: the non-target epilogue
// (docs/design.md section 3c); the plain path, kNegatives = false, compiles to the code it had
// before the flag.
template <typename GradT, bool kVector, bool kNegatives>
__global__ void gradient_tile(const float* __restrict__ dots, const float* __restrict__ rw_chunk, RowInputs in,
                              GradT* __restrict__ grad, int64_t dots_stride, int64_t grad_stride, int64_t first_class,
                              int64_t chunk_classes, int k_count, LossSettings loss, NegativeInputs negatives) {
  const int64_t row = blockIdx.x;
  const float* row_dots = dots + row * dots_stride;
  GradT* row_grad = grad + row * grad_stride;
  const float rx = in.rx[row];
  const RowTerms terms = load_row(in, row);
  RowNegatives hard{};
  if constexpr (kNegatives) hard = load_negatives(negatives, row);
  const int64_t target = chunk_target(in, row, first_class, chunk_classes);
  const int64_t groups = (chunk_classes + kEntriesPerThread - 1) / kEntriesPerThread;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t group = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; group < groups;
       group += stride) {
    const int64_t first = group * kEntriesPerThread;
    if (kVector && first + kEntriesPerThread <= chunk_classes) {
      using Floats = Pack<float, kEntriesPerThread>;
      const Floats d = *reinterpret_cast<const Floats*>(row_dots + first);
      const Floats r = *reinterpret_cast<const Floats*>(rw_chunk + first);
      Pack<GradT, kEntriesPerThread> out;
      for (int i = 0; i < kEntriesPerThread; ++i) {
        class_gradient<kNegatives>(d.v, r.v, rx, i, 1, first + i == target, terms, loss, hard, out.v);
      }
      store_pack(row_grad + first, out);
    } else {
      const int64_t stop = first + kEntriesPerThread < chunk_classes ? first + kEntriesPerThread : chunk_classes;
      for (int64_t j = first; j < stop; ++j) {
        class_gradient<kNegatives>(row_dots, rw_chunk, rx, j, k_count, j == target, terms, loss, hard, row_grad);
      }
    }
  }
}

// project_rows: one warp per row (kLanes lanes, row_math.cuh's order), kVec columns per piece.
constexpr int kRowsPerBlock = kThreads / kLanes;

template <int kVec, typename T>
__device__ __forceinline__ void load_piece(const T* p, float (&out)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(p);
  for (int i = 0; i < kVec; ++i) out[i] = static_cast<float>(pack.v[i]);
}

// Writes one row's projected entries (kScaled: the unit row u = f v formed per entry, eq. (24b)).
template <bool kScaled, int kVec, typename VT, typename OutT>
__device__ __forceinline__ void write_projected(const float* g_row, const VT* v_row, OutT* out_row, int64_t dim,
                                                int lane, float factor, const ProjectionTerms& t) {
  for (int64_t col = static_cast<int64_t>(lane) * kVec; col < dim; col += kLanes * kVec) {
    float g[kVec], w[kVec];
    load_piece<kVec>(g_row + col, g);
    load_piece<kVec>(v_row + col, w);
    Pack<OutT, kVec> result;
    for (int i = 0; i < kVec; ++i) {
      result.v[i] = static_cast<OutT>(kScaled ? projected_entry(g[i], w[i] * factor, t.along)
                                              : projected_entry(g[i], w[i], t.coef));
    }
    store_pack(out_row + col, result);
  }
}

// out = grad - (u . grad) u per row, u = f v, rounded once into OutT (docs/design.md eqs. (23)-(24b)):
// the row is read twice (the second time from L1/L2), written once; the warp takes the per-row
// coefficient of v (row_math.cuh projection_terms: the same work per entry as a precomputed f^2)
// unless it underflows. kVec = 4 when D and every row start are aligned to 4 entries (the host
// checks), else 1.
template <int kVec, typename VT, typename OutT>
__global__ void project_rows_kernel(const float* __restrict__ grad, const VT* __restrict__ v,
                                    const float* __restrict__ factor, OutT* __restrict__ out, int64_t rows,
                                    int64_t dim, int64_t grad_stride, int64_t v_stride, int64_t out_stride) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  if (row >= rows) return;  // a whole warp: the shuffles below see all 32 lanes
  const float* g_row = grad + row * grad_stride;
  const VT* v_row = v + row * v_stride;
  OutT* out_row = out + row * out_stride;
  float partial = 0.f;
  for (int64_t col = static_cast<int64_t>(lane) * kVec; col < dim; col += kLanes * kVec) {
    float g[kVec], w[kVec];
    load_piece<kVec>(g_row + col, g);
    load_piece<kVec>(v_row + col, w);
    partial = piece_dot(partial, g, w, kVec);
  }
  for (int offset = kLanes / 2; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  const float f = factor[row];
  const ProjectionTerms terms = projection_terms(partial, f);  // the same bits on every lane: a uniform branch
  if (terms.per_row) {
    write_projected<false, kVec>(g_row, v_row, out_row, dim, lane, f, terms);
  } else {
    write_projected<true, kVec>(g_row, v_row, out_row, dim, lane, f, terms);
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

void grad_chunk(const at::Tensor& x_in, const at::Tensor& w_rows_in, const at::Tensor& labels_in,
                const at::Tensor& rx_in, const at::Tensor& rw_rows_in, const at::Tensor& lse_in,
                const at::Tensor& grad_rows_in, const at::Tensor& target_dcos_in, at::Tensor& out, int64_t first_class,
                double scale, int64_t sub_centers, double smoothing_per_class,
                const std::optional<at::Tensor>& threshold_in, const std::optional<at::Tensor>& coeffs_in) {
  check_inputs(x_in, w_rows_in, labels_in, sub_centers);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), w_rows = w_rows_in.contiguous(), labels = labels_in.contiguous();
  const int64_t n = x.size(0), width = w_rows.size(0), chunk_classes = width / sub_centers;
  TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.size(0) == n && out.size(1) == width && out.stride(1) == 1 &&
                  out.stride(0) >= width,
              "cuda backend: grad_chunk's out must be an (N, chunk * K) tensor with contiguous columns");
  const auto rx = row_vector(rx_in, n, "rx"), rw_rows = row_vector(rw_rows_in, width, "rw_rows");
  const auto lse = row_vector(lse_in, n, "lse"), grad_rows = row_vector(grad_rows_in, n, "grad_rows");
  const auto target_dcos = row_vector(target_dcos_in, n, "target_dcos");
  if (n == 0 || width == 0) return;
  // rows of the dots padded to 16 bytes (cuBLAS's TMA kernels need a 16-byte leading dimension;
  // ATen's GEMM writes such a view in place)
  const int64_t dots_stride = (width + 3) / 4 * 4;
  auto dots = at::empty({n, dots_stride}, x.options().dtype(at::kFloat)).narrow(1, 0, width);
  chunk_dots(x, w_rows, dots);
  const RowInputs in{labels.data_ptr<int64_t>(), rx.data_ptr<float>(),    nullptr,
                     nullptr,                     nullptr,                lse.data_ptr<float>(),
                     grad_rows.data_ptr<float>(), target_dcos.data_ptr<float>()};
  const LossSettings loss{static_cast<float>(scale), static_cast<float>(smoothing_per_class), false};
  at::Tensor threshold, coeffs;  // kept alive across the launch
  const NegativeInputs negatives = negative_inputs(threshold_in, coeffs_in, n, threshold, coeffs);
  const int64_t groups = (chunk_classes + kEntriesPerThread - 1) / kEntriesPerThread;
  const int64_t blocks_per_row = std::min<int64_t>((groups + kThreads - 1) / kThreads, 65535);
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(blocks_per_row));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // vector accesses need every row start of dots and G, and rw_chunk, aligned to a whole group
  const bool vector = sub_centers == 1 && out.stride(0) % kEntriesPerThread == 0 && aligned(rw_rows.data_ptr(), 16) &&
                      aligned(out.data_ptr(), kEntriesPerThread * out.element_size());
  const auto launch = [&](auto* grad) {
    using GradT = std::remove_pointer_t<decltype(grad)>;
    const bool negated = negatives.threshold != nullptr;
    const auto kernel = vector ? (negated ? gradient_tile<GradT, true, true> : gradient_tile<GradT, true, false>)
                               : (negated ? gradient_tile<GradT, false, true> : gradient_tile<GradT, false, false>);
    kernel<<<grid, kThreads, 0, stream>>>(dots.data_ptr<float>(), rw_rows.data_ptr<float>(), in, grad, dots_stride,
                                          out.stride(0), first_class, chunk_classes, static_cast<int>(sub_centers),
                                          loss, negatives);
  };
  switch (out.scalar_type()) {
    case at::kFloat: launch(out.data_ptr<float>()); break;
    case at::kBFloat16: launch(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: launch(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "cuda backend: grad_chunk writes float32, bfloat16 or float16 tiles");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

template <typename T>
T* typed(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Calls f with a null pointer of the C++ type of a float32, bfloat16 or float16 tensor.
template <typename F>
void with_type(const at::Tensor& t, const char* name, F f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "cuda backend: project_rows' ", name, " must be float32, bfloat16 or float16");
  }
}

}  // namespace

void project_rows(const at::Tensor& grad_in, const at::Tensor& v_in, const at::Tensor& factor_in, at::Tensor& out) {
  TORCH_CHECK(grad_in.is_cuda() && v_in.is_cuda() && out.is_cuda(),
              "cuda backend: project_rows' tensors must be on a GPU");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat, "cuda backend: project_rows' grad must be float32");
  TORCH_CHECK(grad_in.dim() == 2 && v_in.sizes() == grad_in.sizes() && out.sizes() == grad_in.sizes(),
              "cuda backend: project_rows' grad, v and out must share one (rows, D) shape");
  TORCH_CHECK(out.stride(1) == 1, "cuda backend: project_rows' out needs rows with contiguous columns");
  // inputs with strided columns (a transposed x) are copied once; rows may have any stride
  const auto grad = grad_in.stride(1) == 1 ? grad_in : grad_in.contiguous();
  const auto v = v_in.stride(1) == 1 ? v_in : v_in.contiguous();
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t rows = grad.size(0), dim = grad.size(1);
  const auto factor = row_vector(factor_in, rows, "factor");
  if (rows == 0 || dim == 0) return;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // 4-entry pieces when every row start of the three matrices is 4-entry aligned
  const auto row_aligned = [](const at::Tensor& t) {
    return t.stride(0) % 4 == 0 && aligned(t.data_ptr(), 4 * t.element_size());
  };
  const bool vector = dim % 4 == 0 && row_aligned(grad) && row_aligned(v) && row_aligned(out);
  with_type(v, "v", [&](auto* v_type) {
    using VT = std::remove_pointer_t<decltype(v_type)>;
    with_type(out, "out", [&](auto* out_type) {
      using OutT = std::remove_pointer_t<decltype(out_type)>;
      const auto kernel = vector ? project_rows_kernel<4, VT, OutT> : project_rows_kernel<1, VT, OutT>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grad.data_ptr<float>(), typed<VT>(v), factor.data_ptr<float>(), typed<OutT>(out), rows, dim, grad.stride(0),
          v.stride(0), out.stride(0));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace arcface_kernels
