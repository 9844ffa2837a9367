// The `torch` backend's forward with gradients on float32 CPU rows (backends/row_blocks.py,
// docs/backends/torch.md "Gradients in forward") as one op: the whole row-block walk, where a loop
// of torch ops took about forty per block and chunk (the fixed cost of a small head, "Fixed cost
// per call"). For each block of rows, phase 1 writes each class chunk's tile xs_b W_c^T (at::mm_out)
// into the block's buffer, the chunks one after another, and folds it into the block's running
// statistics (cpu_rows::forward_rows, with col_scale rw_c: Z = s cos), leaving exp(z - shift) in
// the tile with the shift of each row's online log-sum-exp update (exp_shift); the row finish
// (finish_row: phi, the statistics, loss, lse, the precise gap, the target gradient factor per
// unit upstream gradient) follows; phase 2 turns each tile into P diag(rw_c) in place, one product
// per entry where an exp was (cpu_rows::backward_rows, exp_scale = exp(shift - lse)) and
// accumulates B_b += P W_c and A_c += P^T Xa_b. Last, dX_b = a B_b projected per block (eq. (23),
// cpu_rows::project_rows with row factor a = s rx on rows with a target) and dW = A projected
// (eq. (24), project_rows' raw_w form). The row kernels are the fused epilogue's
// (the same AVX2 / baseline choice); each row is reduced by one thread in a fixed order, so the
// thread count changes no bit (tests/test_row_blocks.py).
#include "cpu_epilogue.h"
#include "cpu_ops_common.h"
#include "margin_math.cuh"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace arcface_kernels {
namespace {

// torch.maximum: NaN propagates (fmaxf would drop it).
float nan_max(float a, float b) { return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

// torch.logaddexp(0, x), its CPU kernel's formula (0 at x = -inf, x at +inf, NaN propagates).
float logaddexp0(float x) { return std::max(0.f, x) + std::log1p(std::exp(-std::abs(x))); }

// The margin settings finish_row reads, beyond the per-row margins.
struct FinishSettings {
  float scale, inv_scale;
  bool easy_margin, straight_through, smoothing;
  float smoothing_eps, smoothing_per_class, target_shift;  // eps, eps / C, eps - eps / C
};

// The once-per-row tail of the forward (row i): chunked.finish_forward (phi on the target, the row
// statistics), op.finalize (loss, lse, precise gap) and op.target_cosine_gradient's factor per unit
// upstream gradient. in: the walk's nt_max, nt_sum, best_z, target_z, nt_logit_sum (read with
// smoothing only); out: PartialStats' row_max, sum_exp, target_logit, logit_sum, target_cos,
// best_cos, nontarget_sum_exp, then loss, lse, gap and the factor.
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

// The op's own tensors and views, made without a dispatch each (a small head's fixed cost: a
// dispatched at::empty or narrow costs about as much as the row kernels at (64, 8, 2)).
at::Tensor empty_float(at::IntArrayRef size) { return at::detail::empty_cpu(size, at::kFloat); }

// The large ones, dispatched (at::empty): a dispatch mode sees them, as the tests' memory probes
// (tests/alloc_probe.py, bench/live_bytes.py) must to bound the walk's workspace.
at::Tensor empty_float_seen(at::IntArrayRef size) { return at::empty(size, at::kFloat); }

// rows x cols of float32 at `data` with the given strides (col_stride 1: row-major, or the transpose).
at::Tensor matrix(const float* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride = 1) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, {row_stride, col_stride}, at::TensorOptions(at::kFloat));
}

void check_matrix(const at::Tensor& m, int64_t cols, const char* name) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 2 && m.is_contiguous() &&
                  m.size(1) == cols,
              name, ": a contiguous float32 CPU matrix with ", cols, " columns");
}

}  // namespace

// The walk (this file's header) on float32 rows x (N x D, the rows the op's norm pass saw), class
// rows w (C x D), local labels (-1 without a target), `active` (rows with a target in the whole
// problem), the inverse norms rx, rw, their projection factors (N + C: common.projection_factor
// of rx, then of rw, which decides the rows clamped at eps) and the per-row margins m1, m2, m3.
// Blocks of block_rows rows, chunks of chunk_classes classes. Returns PartialStats' eight fields
// (best_class int64), loss, lse, gap, then dX and dW (float32; empty where not asked for: a
// Tensor[] holds no undefined tensor through Python, a dispatch mode's view of the op): the
// gradients of sum_i loss_i over the rows with a target.
std::vector<at::Tensor> row_block_walk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                                       const at::Tensor& active, const at::Tensor& rx, const at::Tensor& rw,
                                       const at::Tensor& projection_factors, const at::Tensor& m1,
                                       const at::Tensor& m2, const at::Tensor& m3, double scale, bool easy_margin,
                                       std::optional<double> clip_eps, bool straight_through, double label_smoothing,
                                       int64_t num_classes, int64_t block_rows, int64_t chunk_classes, bool need_dx,
                                       bool need_dw) {
  const int64_t n = x.size(0), dim = x.size(1), c = w.size(0);
  check_matrix(x, dim, "x");
  check_matrix(w, dim, "w");
  check_vector(labels, n, at::kLong, "labels");
  check_vector(active, n, at::kBool, "active");
  for (const at::Tensor* v : {&rx, &m1, &m2, &m3}) check_vector(*v, n, at::kFloat, "rx, m1, m2, m3");
  check_vector(rw, c, at::kFloat, "rw");
  check_vector(projection_factors, n + c, at::kFloat, "projection_factors");
  TORCH_CHECK(n > 0 && c > 0 && block_rows > 0 && chunk_classes > 0 && num_classes > 0,
              "row_block_walk: rows, classes, block_rows, chunk_classes and num_classes must be positive");
  // the GEMMs and buffers below are internal: no autograd layers
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const float s = static_cast<float>(scale);
  // the Python path's float32 constants: s, 1 / s (torch divides by a scalar as a product), and
  // eps / C, eps - eps / C formed in double, then rounded
  const double per_class = label_smoothing / static_cast<double>(num_classes);
  const FinishSettings f{s, 1.f / s, easy_margin, straight_through, label_smoothing != 0.0,
                         static_cast<float>(label_smoothing), static_cast<float>(per_class),
                         static_cast<float>(label_smoothing - per_class)};

  // one scratch buffer: xs = (s rx) X; Xa = xs on rows with a target (0 elsewhere), with dW; a
  // block's tiles, the chunks one after another; B_b, with dX
  const int64_t rows_per_block = std::min(block_rows, n);
  const int64_t operands = (need_dw ? 2 : 1) * n * dim;
  at::Tensor scratch = empty_float_seen({operands + rows_per_block * c + (need_dx ? rows_per_block * dim : 0)});
  float* xsp = scratch.data_ptr<float>();
  float* tile_buffer = xsp + operands;
  float *xap = need_dw ? xsp + n * dim : nullptr, *b = tile_buffer + rows_per_block * c;
  std::vector<float> row_factor(n);  // the dX row factor a = s rx on rows with a target
  // eq. (23)'s weight of (x . grad) x, the row's factor squared (common.projection_scale), and
  // eq. (24)'s flag per class row: projected where its factor is not 0
  const float* factors = projection_factors.data_ptr<float>();
  std::vector<float> row_projected(need_dx ? n : 0), class_projected(need_dw ? c : 0);
  for (size_t i = 0; i < row_projected.size(); ++i) row_projected[i] = factors[i] * factors[i];
  for (size_t j = 0; j < class_projected.size(); ++j) class_projected[j] = factors[n + j] > 0.f ? 1.f : 0.f;
  {
    const float *xp = x.data_ptr<float>(), *rxp = rx.data_ptr<float>();
    const bool* act = active.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      const float r = rxp[i] * s;
      row_factor[i] = act[i] ? r : 0.f;
      for (int64_t j = 0; j < dim; ++j) {
        const float v = xp[i * dim + j] * r;
        xsp[i * dim + j] = v;
        if (need_dw) xap[i * dim + j] = act[i] ? v : 0.f;
      }
    }
  }

  std::vector<at::Tensor> out;
  for (int k = 0; k < 10; ++k) out.push_back(empty_float({n}));
  at::Tensor best_class = at::detail::empty_cpu({n}, at::kLong);
  std::fill_n(best_class.data_ptr<int64_t>(), n, 0);
  at::Tensor dx = empty_float_seen({need_dx ? n : 0, dim});
  at::Tensor dw = empty_float_seen({need_dw ? c : 0, dim});
  const float *w_ptr = w.data_ptr<float>();

  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  const bool* active_ptr = active.data_ptr<bool>();
  const float *rw_ptr = rw.data_ptr<float>(), *m1_ptr = m1.data_ptr<float>(), *m2_ptr = m2.data_ptr<float>(),
              *m3_ptr = m3.data_ptr<float>();
  const float inf = std::numeric_limits<float>::infinity();
  // a block's running statistics (forward_rows) and its target gradient factor (finish_row); per
  // chunk and row, the shift of the exponentials phase 1 leaves in the tile, then phase 2's factor
  const int64_t chunks = (c + chunk_classes - 1) / chunk_classes;
  std::vector<float> nt_max, nt_sum, best_z, target_z, logit_sum, factor(rows_per_block);
  std::vector<float> shifts(chunks * rows_per_block), exp_scale(rows_per_block);
  for (int64_t first = 0; first < n; first += block_rows) {
    const int64_t count = std::min(block_rows, n - first);
    const at::Tensor xs_b = matrix(xsp + first * dim, count, dim, dim);
    // the (count x width) tile of the chunk of classes from `start`, contiguous
    const auto tile = [&](int64_t start) { return tile_buffer + count * start; };
    nt_max.assign(count, -inf);
    best_z.assign(count, -inf);
    nt_sum.assign(count, 0.f);
    target_z.assign(count, 0.f);
    logit_sum.assign(count, 0.f);
    // phase 1: Z_c, folded into the running statistics
    for (int64_t start = 0; start < c; start += chunk_classes) {
      const int64_t width = std::min(chunk_classes, c - start);
      float* z = tile(start);
      at::Tensor z_view = matrix(z, count, width, width);
      at::mm_out(z_view, xs_b, matrix(w_ptr + start * dim, dim, width, 1, dim));  // xs_b W_c^T
      const cpu_rows::ForwardRows args{z,                  rw_ptr + start,      label_ptr + first,
                                       start,              width,               nt_max.data(),
                                       nt_sum.data(),      best_z.data(),       target_z.data(),
                                       logit_sum.data(),   best_class.data_ptr<int64_t>() + first,
                                       f.smoothing,        cpu_rows::HardMap{nullptr, nullptr},
                                       nullptr,            shifts.data() + start / chunk_classes * count};
      each_row(count, width, args, cpu_rows::avx2::forward_rows<float, false>,
               cpu_rows::baseline::forward_rows<float, false>);
    }
    // the block's row finish
    const float* in[] = {nt_max.data(), nt_sum.data(), best_z.data(), target_z.data(), logit_sum.data()};
    float* rows[11];
    for (int k = 0; k < 10; ++k) rows[k] = out[k].data_ptr<float>() + first;
    rows[10] = factor.data();
    for (int64_t i = 0; i < count; ++i) {
      clip_eps.has_value() ? finish_row<true>(i, in, label_ptr + first, active_ptr + first, m1_ptr + first,
                                              m2_ptr + first, m3_ptr + first, f, static_cast<float>(*clip_eps), rows)
                           : finish_row<false>(i, in, label_ptr + first, active_ptr + first, m1_ptr + first,
                                               m2_ptr + first, m3_ptr + first, f, 0.f, rows);
      factor[i] *= f.inv_scale;  // P_iy - [j = y] for g = 1 (chunked.backward's target_p)
    }
    // phase 2: P_c diag(rw_c) in place, then B_b += P W_c, A_c += P^T Xa_b
    at::Tensor b_view = matrix(b, count, dim, dim);
    for (int64_t start = 0; start < c; start += chunk_classes) {
      const int64_t width = std::min(chunk_classes, c - start);
      float* p = tile(start);
      // the tile holds exp(z - shift) (phase 1): P = exp(z - lse) is that times exp(shift - lse)
      const float* shift = shifts.data() + start / chunk_classes * count;
      for (int64_t i = 0; i < count; ++i) exp_scale[i] = std::exp(shift[i] - rows[8][i]);
      const cpu_rows::BackwardRows args{p,                   label_ptr + first, start,
                                        width,               factor.data(),     per_class,
                                        rw_ptr + start,      nullptr,           cpu_rows::HardMap{nullptr, nullptr},
                                        exp_scale.data()};
      each_row(count, width, args, cpu_rows::avx2::backward_rows<float, false>,
               cpu_rows::baseline::backward_rows<float, false>);
      const at::Tensor p_view = matrix(p, count, width, width), w_c = matrix(w_ptr + start * dim, width, dim, dim);
      if (need_dx && start == 0) {
        at::mm_out(b_view, p_view, w_c);
      } else if (need_dx) {
        b_view.addmm_(p_view, w_c);
      }
      if (need_dw) {  // the first block writes A_c, the others add to it
        at::Tensor dw_c = matrix(dw.data_ptr<float>() + start * dim, width, dim, dim);
        const at::Tensor p_t = matrix(p, width, count, 1, width), xa_b = matrix(xap + first * dim, count, dim, dim);
        if (first == 0) {
          at::mm_out(dw_c, p_t, xa_b);
        } else {
          dw_c.addmm_(p_t, xa_b);
        }
      }
    }
    if (need_dx) {  // eq. (23): dX_b = a B_b - proj (x . a B_b) x
      const cpu_rows::ProjectRows args{b,              x.data_ptr<float>() + first * dim,
                                       row_factor.data() + first, row_projected.data() + first,
                                       dx.data_ptr<float>() + first * dim, dim, false};
      each_row(count, dim, args, cpu_rows::avx2::project_rows<float, float, float>,
               cpu_rows::baseline::project_rows<float, float, float>);
    }
  }
  if (need_dw) {  // eq. (24) on the summed A, in place (project_chunk's raw_w form)
    const cpu_rows::ProjectRows args{dw.data_ptr(), w.data_ptr(), rw.data_ptr(), class_projected.data(),
                                     dw.data_ptr(), dim,          true};
    each_row(c, dim, args, cpu_rows::avx2::project_rows<float, float, float>, cpu_rows::baseline::project_rows<float, float, float>);
  }
  // PartialStats' order: best_class before nontarget_sum_exp
  out.insert(out.begin() + 6, best_class);
  out.push_back(dx);
  out.push_back(dw);
  return out;
}

TORCH_LIBRARY_FRAGMENT(arcface_kernels_cpu, m) {
  m.def("row_block_walk(Tensor x, Tensor w, Tensor labels, Tensor active, Tensor rx, Tensor rw, "
        "Tensor projection_factors, Tensor m1, Tensor m2, Tensor m3, float scale, "
        "bool easy_margin, float? clip_eps, bool straight_through, float label_smoothing, int num_classes, "
        "int block_rows, int chunk_classes, bool need_dx, bool need_dw) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(arcface_kernels_cpu, CPU, m) { m.impl("row_block_walk", &row_block_walk); }

}  // namespace arcface_kernels
