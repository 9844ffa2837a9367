// The `torch` backend's fused CPU epilogue (docs/backends/torch.md, "Fused CPU epilogue"): the
// per-row work on a class chunk's (N x chunk) tile of logits Z = s cos in one sweep per row, where
// the pure-torch loop of backends/chunked.py runs several full-tile ops. Same math and rules as
// that loop (docs/design.md sections 4-5): the lowest class wins ties, an all -inf row adds 0 to
// its sum, NaN propagates. Rows are split across threads (at::parallel_for); each row is reduced
// by one thread in a fixed order, so results do not depend on the thread count.
//
// The row kernels (cpu_epilogue_rows.h) exist twice: the baseline copy compiled here, and the AVX2
// + FMA copy of cpu_epilogue_avx2.cpp, taken when torch's own CPU capability (at::get_cpu_capability,
// which ATEN_CPU_CAPABILITY overrides) is AVX2 or AVX512.
//
// The extension module arcface_kernels._cpu (setup.py builds it with or without CUDA): importing it
// registers torch.ops.arcface_kernels_cpu.{forward_tile, backward_tile, project_chunk, vector_isa}
// and, from cpu_row_blocks.cpp, row_block_walk; backends/chunked.py and row_blocks.py use torch ops
// (the class walk) without it.
#include <Python.h>

#define ARCFACE_CPU_ISA baseline
#include "cpu_epilogue_rows.h"
#include "cpu_ops_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>

namespace arcface_kernels {
namespace {

void check_tile(const at::Tensor& tile, const at::Tensor& labels) {
  TORCH_CHECK(tile.device().is_cpu() && tile.dim() == 2 && tile.is_contiguous(), "tile: a contiguous 2-d CPU tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.dim() == 1 &&
                  labels.size(0) == tile.size(0),
              "labels: contiguous int64, one per tile row");
}

const void* optional_vector(const std::optional<at::Tensor>& v, int64_t rows, at::ScalarType dtype, const char* name) {
  if (!v.has_value()) return nullptr;
  check_vector(*v, rows, dtype, name);
  return v->data_ptr();
}

// The non-target epilogue's threshold (one per row) and (A, B, E) in the tile's dtype, or nullptrs
// for the plain path (cpu_rows::HardMap).
cpu_rows::HardMap hard_map(const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& coeffs,
                           int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(threshold.has_value() == coeffs.has_value(), "threshold and coeffs go together");
  return {optional_vector(threshold, rows, dtype, "threshold"), optional_vector(coeffs, 3, dtype, "coeffs")};
}

// Runs rows(std::bool_constant<mapped>{}): the row kernels' plain or mapped specialization.
template <typename Rows>
void specialized(bool mapped, const Rows& rows) {
  mapped ? rows(std::true_type{}) : rows(std::false_type{});
}

}  // namespace

// Folds one chunk's tile z (N x chunk: the logits s cos of classes [first_class, first_class +
// chunk), or with col_scale = rw_c the products xs . w_j, or with row_scale = s rx too the products
// x . w_j of bfloat16 operands; overwritten) into the running row statistics
// (cpu_rows::forward_rows); with threshold and coeffs, the non-target epilogue on the way.
void forward_tile(at::Tensor& z, const at::Tensor& labels, int64_t first_class, at::Tensor& nt_max,
                  at::Tensor& nt_sum, at::Tensor& best_z, at::Tensor& best_class, at::Tensor& target_z,
                  at::Tensor& logit_sum, bool smoothing, const std::optional<at::Tensor>& col_scale,
                  const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& coeffs,
                  const std::optional<at::Tensor>& row_scale) {
  check_tile(z, labels);
  TORCH_CHECK(!row_scale.has_value() || col_scale.has_value(), "forward_tile: row_scale goes with col_scale");
  const int64_t n = z.size(0);
  for (const at::Tensor* v : {&nt_max, &nt_sum, &best_z, &target_z, &logit_sum}) {
    check_vector(*v, n, z.scalar_type(), "forward_tile's row statistics");
  }
  check_vector(best_class, n, at::kLong, "best_class");
  const cpu_rows::ForwardRows args{z.data_ptr(),
                                   optional_vector(col_scale, z.size(1), z.scalar_type(), "col_scale"),
                                   labels.data_ptr<int64_t>(), first_class,  z.size(1),
                                   nt_max.data_ptr(),    nt_sum.data_ptr(),          best_z.data_ptr(),
                                   target_z.data_ptr(),  logit_sum.data_ptr(),       best_class.data_ptr<int64_t>(),
                                   smoothing,            hard_map(threshold, coeffs, n, z.scalar_type()),
                                   optional_vector(row_scale, n, z.scalar_type(), "row_scale")};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "forward_tile", [&] {
    specialized(threshold.has_value(), [&](auto mapped) {
      constexpr bool kMapped = decltype(mapped)::value;
      each_row(n, args.width, args, cpu_rows::avx2::forward_rows<scalar_t, kMapped>,
               cpu_rows::baseline::forward_rows<scalar_t, kMapped>);
    });
  });
}

// p (N x chunk, holding Z - lse) becomes P = exp(p) - smooth with the target entries set to
// target_p, in place; or, given col_scale = rw_c and lse, p holds xs . w_j and becomes
// P diag(rw_c) (cpu_rows::backward_rows).
// With threshold and coeffs, the non-target epilogue: p holds Z (or xs . w_j with col_scale), lse
// is given, and the hard entries' P is multiplied by dh/dc. With row_scale = s rx (col_scale given,
// plain path): p holds x . w_j of bfloat16 operands (forward_tile's row_scale).
void backward_tile(at::Tensor& p, const at::Tensor& labels, int64_t first_class, const at::Tensor& target_p,
                   double smooth, const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& lse,
                   const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& coeffs,
                   const std::optional<at::Tensor>& row_scale) {
  check_tile(p, labels);
  check_vector(target_p, p.size(0), p.scalar_type(), "target_p");
  TORCH_CHECK(lse.has_value() == (col_scale.has_value() || threshold.has_value()),
              "backward_tile: lse is given exactly with col_scale or threshold");
  TORCH_CHECK(!row_scale.has_value() || (col_scale.has_value() && !threshold.has_value()),
              "backward_tile: row_scale goes with col_scale, on the plain path, on a tile of products");
  const cpu_rows::BackwardRows args{p.data_ptr(),
                                    labels.data_ptr<int64_t>(),
                                    first_class,
                                    p.size(1),
                                    target_p.data_ptr(),
                                    smooth,
                                    optional_vector(col_scale, p.size(1), p.scalar_type(), "col_scale"),
                                    optional_vector(lse, p.size(0), p.scalar_type(), "lse"),
                                    hard_map(threshold, coeffs, p.size(0), p.scalar_type()),
                                    nullptr,
                                    optional_vector(row_scale, p.size(0), p.scalar_type(), "row_scale")};
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "backward_tile", [&] {
    specialized(threshold.has_value(), [&](auto mapped) {
      constexpr bool kMapped = decltype(mapped)::value;
      each_row(p.size(0), args.width, args, cpu_rows::avx2::backward_rows<scalar_t, kMapped>,
               cpu_rows::baseline::backward_rows<scalar_t, kMapped>);
    });
  });
}

// dW's rows `out` of one chunk from a = P^T Xa (scratch), ws = rw w, rw and the projection flags;
// with raw_w, from a = A_c and the raw rows w, float32 or (bfloat16 operands) bfloat16 under a
// float32 `a` (cpu_rows::project_rows). `out` may be `a` itself.
void project_chunk(at::Tensor& a, const at::Tensor& ws, const at::Tensor& rw, const at::Tensor& projected,
                   at::Tensor& out, bool raw_w) {
  const bool bf16_rows = raw_w && a.scalar_type() == at::kFloat && ws.scalar_type() == at::kBFloat16;
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.is_contiguous() && ws.is_contiguous() &&
                  ws.sizes() == a.sizes() && (ws.scalar_type() == a.scalar_type() || bf16_rows),
              "a, ws: contiguous CPU matrices of one shape and dtype (ws bfloat16 only with raw_w "
              "under a float32 a)");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == a.sizes(), "out: contiguous, of a's shape");
  check_vector(rw, a.size(0), a.scalar_type(), "rw");
  check_vector(projected, a.size(0), a.scalar_type(), "projected");
  const cpu_rows::ProjectRows args{a.data_ptr(),   ws.data_ptr(), rw.data_ptr(), projected.data_ptr(),
                                   out.data_ptr(), a.size(1),     raw_w};
  // W: ws's dtype (a's, or bfloat16 under float32); O: out's
  const auto run = [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "project_chunk_out", [&] {
      each_row(a.size(0), args.dim, args, cpu_rows::avx2::project_rows<T, W, scalar_t>,
               cpu_rows::baseline::project_rows<T, W, scalar_t>);
    });
  };
  if (a.scalar_type() == at::kDouble) {
    run(double{}, double{});
  } else if (ws.scalar_type() == at::kBFloat16) {
    run(float{}, c10::BFloat16{});
  } else {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "project_chunk: a is float32 or float64");
    run(float{}, float{});
  }
}

// Which copy of the row kernels runs here: "avx2" or "baseline".
std::string vector_isa() { return use_avx2() ? "avx2" : "baseline"; }

TORCH_LIBRARY(arcface_kernels_cpu, m) {
  m.def("forward_tile(Tensor(a!) z, Tensor labels, int first_class, Tensor(b!) nt_max, Tensor(c!) nt_sum, "
        "Tensor(d!) best_z, Tensor(e!) best_class, Tensor(f!) target_z, Tensor(g!) logit_sum, bool smoothing, "
        "Tensor? col_scale=None, Tensor? threshold=None, Tensor? coeffs=None, Tensor? row_scale=None) -> ()");
  m.def("backward_tile(Tensor(a!) p, Tensor labels, int first_class, Tensor target_p, float smooth, "
        "Tensor? col_scale=None, Tensor? lse=None, Tensor? threshold=None, Tensor? coeffs=None, "
        "Tensor? row_scale=None) -> ()");
  m.def("project_chunk(Tensor(a!) a, Tensor ws, Tensor rw, Tensor projected, Tensor(b!) out, bool raw_w=False) -> ()");
  m.def("vector_isa() -> str", &vector_isa);
}

TORCH_LIBRARY_IMPL(arcface_kernels_cpu, CPU, m) {
  m.impl("forward_tile", &forward_tile);
  m.impl("backward_tile", &backward_tile);
  m.impl("project_chunk", &project_chunk);
}

}  // namespace arcface_kernels

static struct PyModuleDef cpu_module_def = {PyModuleDef_HEAD_INIT, "_cpu", "arcface_kernels CPU ops", -1, nullptr};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&cpu_module_def); }
