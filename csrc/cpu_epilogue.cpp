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
// registers torch.ops.arcface_kernels_cpu.{forward_tile, backward_tile, project_chunk, finish_rows,
// vector_isa}; backends/chunked.py and op.py use torch ops without it.
#include <Python.h>

#define ARCFACE_CPU_ISA baseline
#include "cpu_epilogue_rows.h"

#include "margin_math.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>
#include <type_traits>

namespace arcface_kernels {
namespace {

bool use_avx2() {
  if (!cpu_rows::avx2::vectorized_for_avx2()) return false;
  const std::string capability = at::get_cpu_capability();
  return capability == "AVX2" || capability == "AVX512";
}

int64_t grain(int64_t width) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1)); }

void check_tile(const at::Tensor& tile, const at::Tensor& labels) {
  TORCH_CHECK(tile.device().is_cpu() && tile.dim() == 2 && tile.is_contiguous(), "tile: a contiguous 2-d CPU tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.dim() == 1 &&
                  labels.size(0) == tile.size(0),
              "labels: contiguous int64, one per tile row");
}

void check_vector(const at::Tensor& v, int64_t rows, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(v.scalar_type() == dtype && v.is_contiguous() && v.dim() == 1 && v.size(0) == rows, name,
              ": a contiguous vector, one entry per row, of dtype ", dtype);
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
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "forward_tile", [&] {
    specialized(threshold.has_value(), [&](auto mapped) {
      at::parallel_for(0, n, grain(args.width), [&](int64_t begin, int64_t end) {
        avx2 ? cpu_rows::avx2::forward_rows<scalar_t, decltype(mapped)::value>(args, begin, end)
             : cpu_rows::baseline::forward_rows<scalar_t, decltype(mapped)::value>(args, begin, end);
      });
    });
  });
}

// p (N x chunk, holding Z - lse) becomes P = exp(p) - smooth with the target entries set to
// target_p, in place; or, given col_scale = rw_c and lse, p holds xs . w_j (Z itself with
// holds_logits: the tile forward_tile left) and becomes P diag(rw_c) (cpu_rows::backward_rows).
// With threshold and coeffs, the non-target epilogue: p holds Z (or xs . w_j with col_scale), lse
// is given, and the hard entries' P is multiplied by dh/dc. With row_scale = s rx (col_scale given,
// plain path): p holds x . w_j of bfloat16 operands (forward_tile's row_scale).
void backward_tile(at::Tensor& p, const at::Tensor& labels, int64_t first_class, const at::Tensor& target_p,
                   double smooth, const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& lse,
                   const std::optional<at::Tensor>& threshold, const std::optional<at::Tensor>& coeffs,
                   bool holds_logits, const std::optional<at::Tensor>& row_scale) {
  check_tile(p, labels);
  check_vector(target_p, p.size(0), p.scalar_type(), "target_p");
  TORCH_CHECK(lse.has_value() == (col_scale.has_value() || threshold.has_value()),
              "backward_tile: lse is given exactly with col_scale or threshold");
  TORCH_CHECK(!holds_logits || (col_scale.has_value() && !threshold.has_value()),
              "backward_tile: holds_logits goes with col_scale, on the plain path");
  TORCH_CHECK(!row_scale.has_value() || (col_scale.has_value() && !threshold.has_value() && !holds_logits),
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
                                    holds_logits,
                                    optional_vector(row_scale, p.size(0), p.scalar_type(), "row_scale")};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "backward_tile", [&] {
    specialized(threshold.has_value(), [&](auto mapped) {
      at::parallel_for(0, p.size(0), grain(args.width), [&](int64_t begin, int64_t end) {
        avx2 ? cpu_rows::avx2::backward_rows<scalar_t, decltype(mapped)::value>(args, begin, end)
             : cpu_rows::baseline::backward_rows<scalar_t, decltype(mapped)::value>(args, begin, end);
      });
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
  const bool avx2 = use_avx2();
  // W: ws's dtype (a's, or bfloat16 under float32); O: out's
  const auto run = [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "project_chunk_out", [&] {
      at::parallel_for(0, a.size(0), grain(args.dim), [&](int64_t begin, int64_t end) {
        avx2 ? cpu_rows::avx2::project_rows<T, W, scalar_t>(args, begin, end)
             : cpu_rows::baseline::project_rows<T, W, scalar_t>(args, begin, end);
      });
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

namespace {

// torch.maximum: NaN propagates (fmaxf would drop it).
float nan_max(float a, float b) { return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

// torch.logaddexp(0, x), its CPU kernel's formula (0 at x = -inf, x at +inf, NaN propagates).
float logaddexp0(float x) { return std::max(0.f, x) + std::log1p(std::exp(-std::abs(x))); }

// The margin settings finish_rows reads, beyond the per-row margins.
struct FinishSettings {
  float scale, inv_scale;
  bool easy_margin, straight_through, smoothing;
  float smoothing_eps, smoothing_per_class, target_shift;  // eps, eps / C, eps - eps / C
};

template <bool kClip>
void finish_row(int64_t i, const float* const* in, const int64_t* labels, const bool* active, const float* m1,
                const float* m2, const float* m3, const FinishSettings& f, float clip_eps, float* const* out) {
  const float nt_max = in[0][i], nt_sum = in[1][i], best_z = in[2][i], target_z = in[3][i];
  const bool has_target = labels[i] >= 0, row_active = active[i];
  // chunked.finish_forward
  const float target_cos = has_target ? target_z * f.inv_scale : 0.f;
  // a NaN cosine: phi's clamp (fmaxf) would make it -1, torch.clamp keeps it (margins.phi: NaN, and
  // dphi/dc NaN but where straight_through or easy_margin make it 1)
  const bool nan_cos = target_cos != target_cos;
  const float target_logit =
      has_target ? f.scale * (nan_cos ? target_cos : phi<kClip>(target_cos, m1[i], m2[i], m3[i], f.easy_margin,
                                                                 clip_eps))
                 : 0.f;
  const float row_max = has_target ? nan_max(nt_max, target_logit) : nt_max;
  const float shift = row_max == -INFINITY ? 0.f : row_max;
  const float nontarget_sum_exp = nt_sum * std::exp(nt_max - shift);
  const float sum_exp = nontarget_sum_exp + (has_target ? std::exp(target_logit - shift) : 0.f);
  const float logit_sum = f.smoothing ? in[4][i] + target_logit : 0.f;
  // op.finalize, with the non-target sum (eq. (12a))
  const float lse = row_max + std::log(sum_exp);
  float gap = logaddexp0(std::log(nontarget_sum_exp) + row_max - target_logit);
  gap = row_active ? gap : 0.f;
  float loss = gap;
  if (f.smoothing) loss = loss + f.smoothing_eps * target_logit - f.smoothing_per_class * logit_sum;
  // op.target_cosine_gradient per unit upstream gradient (eqs. (16)-(17))
  const float slope = !nan_cos ? dphi_dcos<kClip>(target_cos, m1[i], m2[i], f.easy_margin, f.straight_through, clip_eps)
                     : (f.straight_through || f.easy_margin) ? 1.f
                                                             : target_cos;
  const float factor = f.scale * (std::expm1(-gap) + f.target_shift) * slope;
  const float values[] = {row_max,           sum_exp, target_logit, logit_sum, target_cos, best_z * f.inv_scale,
                          nontarget_sum_exp, row_active ? loss : 0.f, lse, gap, row_active ? factor : 0.f};
  for (int k = 0; k < 11; ++k) out[k][i] = values[k];
}

}  // namespace

// The once-per-row tail of the training step's forward on float32 rows (backends/row_blocks.py,
// via op.finish_rows): chunked.finish_forward (phi on the target, the row statistics), op.finalize
// (loss, lse, precise gap) and op.target_cosine_gradient's factor per unit upstream gradient, in
// one pass where torch ops take about a hundred (docs/backends/torch.md, "Fixed cost per call").
// Inputs: the walk's running row statistics (nt_logit_sum, read with label smoothing only), local
// labels (-1 without a target), the rows with a target in the whole problem (`active`) and the
// per-row margins. Returns PartialStats' row_max, sum_exp, target_logit, logit_sum, target_cos,
// best_cos, nontarget_sum_exp, then loss, lse, gap and the factor: eleven new (N,) tensors.
std::vector<at::Tensor> finish_rows(const at::Tensor& nt_max, const at::Tensor& nt_sum, const at::Tensor& best_z,
                                    const at::Tensor& target_z, const std::optional<at::Tensor>& nt_logit_sum,
                                    const at::Tensor& labels, const at::Tensor& active, const at::Tensor& m1,
                                    const at::Tensor& m2, const at::Tensor& m3, double scale, bool easy_margin,
                                    std::optional<double> clip_eps, bool straight_through, double label_smoothing,
                                    int64_t num_classes) {
  const int64_t n = nt_max.size(0);
  for (const at::Tensor* v : {&nt_max, &nt_sum, &best_z, &target_z, &m1, &m2, &m3}) {
    check_vector(*v, n, at::kFloat, "finish_rows' row inputs");
  }
  check_vector(labels, n, at::kLong, "labels");
  check_vector(active, n, at::kBool, "active");
  TORCH_CHECK(num_classes > 0, "finish_rows: num_classes must be positive");
  TORCH_CHECK(label_smoothing == 0.0 || nt_logit_sum.has_value(), "finish_rows: smoothing reads nt_logit_sum");
  std::vector<at::Tensor> out;
  float* rows[11];
  for (int k = 0; k < 11; ++k) {
    out.push_back(at::empty({n}, nt_max.options()));
    rows[k] = out.back().data_ptr<float>();
  }
  const float* in[] = {nt_max.data_ptr<float>(), nt_sum.data_ptr<float>(), best_z.data_ptr<float>(),
                       target_z.data_ptr<float>(),
                       static_cast<const float*>(optional_vector(nt_logit_sum, n, at::kFloat, "nt_logit_sum"))};
  // the Python path's float32 constants: s, 1 / s (torch divides by a scalar as a product), and
  // eps / C, eps - eps / C formed in double, then rounded
  const double per_class = label_smoothing / static_cast<double>(num_classes);
  const FinishSettings f{static_cast<float>(scale), 1.f / static_cast<float>(scale), easy_margin, straight_through,
                         label_smoothing != 0.0, static_cast<float>(label_smoothing), static_cast<float>(per_class),
                         static_cast<float>(label_smoothing - per_class)};
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  const bool* active_ptr = active.data_ptr<bool>();
  const float *m1_ptr = m1.data_ptr<float>(), *m2_ptr = m2.data_ptr<float>(), *m3_ptr = m3.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    clip_eps.has_value()
        ? finish_row<true>(i, in, label_ptr, active_ptr, m1_ptr, m2_ptr, m3_ptr, f, static_cast<float>(*clip_eps), rows)
        : finish_row<false>(i, in, label_ptr, active_ptr, m1_ptr, m2_ptr, m3_ptr, f, 0.f, rows);
  }
  return out;
}

// Which copy of the row kernels runs here: "avx2" or "baseline".
std::string vector_isa() { return use_avx2() ? "avx2" : "baseline"; }

TORCH_LIBRARY(arcface_kernels_cpu, m) {
  m.def("forward_tile(Tensor(a!) z, Tensor labels, int first_class, Tensor(b!) nt_max, Tensor(c!) nt_sum, "
        "Tensor(d!) best_z, Tensor(e!) best_class, Tensor(f!) target_z, Tensor(g!) logit_sum, bool smoothing, "
        "Tensor? col_scale=None, Tensor? threshold=None, Tensor? coeffs=None, Tensor? row_scale=None) -> ()");
  m.def("backward_tile(Tensor(a!) p, Tensor labels, int first_class, Tensor target_p, float smooth, "
        "Tensor? col_scale=None, Tensor? lse=None, Tensor? threshold=None, Tensor? coeffs=None, "
        "bool holds_logits=False, Tensor? row_scale=None) -> ()");
  m.def("project_chunk(Tensor(a!) a, Tensor ws, Tensor rw, Tensor projected, Tensor(b!) out, bool raw_w=False) -> ()");
  m.def("finish_rows(Tensor nt_max, Tensor nt_sum, Tensor best_z, Tensor target_z, Tensor? nt_logit_sum, "
        "Tensor labels, Tensor active, Tensor m1, Tensor m2, Tensor m3, float scale, bool easy_margin, "
        "float? clip_eps, bool straight_through, float label_smoothing, int num_classes) -> Tensor[]");
  m.def("vector_isa() -> str", &vector_isa);
}

TORCH_LIBRARY_IMPL(arcface_kernels_cpu, CPU, m) {
  m.impl("forward_tile", &forward_tile);
  m.impl("backward_tile", &backward_tile);
  m.impl("project_chunk", &project_chunk);
  m.impl("finish_rows", &finish_rows);
}

}  // namespace arcface_kernels

static struct PyModuleDef cpu_module_def = {PyModuleDef_HEAD_INIT, "_cpu", "arcface_kernels CPU ops", -1, nullptr};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&cpu_module_def); }
