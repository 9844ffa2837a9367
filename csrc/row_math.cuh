// The per-entry and per-row arithmetic of the epilogue kernels (forward.cu, backward.cu): the
// logit and the loss gradient of one (row, class) entry, and the online softmax statistics of a
// row's entries. Host and device functions: the host build is checked against the Python rules
// in tests/test_cuda_math_host.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "margin_math.cuh"

namespace arcface_kernels {

// Per-row inputs of the loss: margins, and in backward the row's lse, incoming gradient and the
// target entry's dcos (computed once per row by the op: op.target_cosine_gradient).
struct RowTerms {
  float m1, m2, m3;
  float lse;          // backward only
  float grad;         // backward only; 0 on ignored rows
  float target_dcos;  // backward only
};

struct LossSettings {
  float scale;
  float smoothing_per_class;  // eps / C (backward)
  bool easy_margin;           // forward
};

// z = s * cos, with the margin on the target (docs/design.md section 3); kClip: phi's clip rule at
// clip_eps (a kernel argument of its own: a wider LossSettings would change the plain kernels' code).
template <bool kClip = false>
ARCFACE_HD float entry_logit(float c, bool is_target, const RowTerms& row, const LossSettings& loss,
                             float clip_eps = 0.f) {
  return loss.scale * (is_target ? phi<kClip>(c, row.m1, row.m2, row.m3, loss.easy_margin, clip_eps) : c);
}

// d loss / d cos of one entry (docs/design.md eqs. (15)-(17)): s g (p - eps / C) off the target; the
// target's was computed once per row from the precise loss (no margin math in backward).
ARCFACE_HD float entry_cosine_gradient(float c, bool is_target, const RowTerms& row, const LossSettings& loss) {
  if (is_target) return row.target_dcos;
  return loss.scale * row.grad * (expf(loss.scale * c - row.lse) - loss.smoothing_per_class);
}

// The non-target epilogue of one row (docs/design.md section 3c, arcface_kernels/negatives.py):
// its threshold tau and the map's coefficients (a, b, e).
struct RowNegatives {
  float threshold;
  float a, b, e;
};

// The mask of eq. (N1): a non-target entry whose cosine is above the row's threshold (a NaN is not).
ARCFACE_HD bool is_hard(float c, bool is_target, const RowNegatives& n) { return !is_target && c > n.threshold; }

// Eq. (N1): h(c) = c (a c + b) + e on a hard entry.
ARCFACE_HD float mapped_cosine(float c, const RowNegatives& n) { return c * (n.a * c + n.b) + n.e; }

// Eq. (N2): dh/dc = 2 a c + b on a hard entry.
ARCFACE_HD float map_slope(float c, const RowNegatives& n) { return 2.f * n.a * c + n.b; }

// entry_logit under the non-target epilogue: s h(c) on a hard entry.
template <bool kClip = false>
ARCFACE_HD float remapped_logit(float c, bool is_target, const RowTerms& row, const LossSettings& loss,
                                const RowNegatives& n, float clip_eps = 0.f) {
  return is_hard(c, is_target, n) ? loss.scale * mapped_cosine(c, n)
                                  : entry_logit<kClip>(c, is_target, row, loss, clip_eps);
}

// entry_cosine_gradient under the non-target epilogue: on a hard entry the logit is s h(c), so
// dcos = s g (p - eps / C) dh/dc with p = exp(s h(c) - lse) (docs/design.md section 3c).
ARCFACE_HD float remapped_cosine_gradient(float c, bool is_target, const RowTerms& row, const LossSettings& loss,
                                          const RowNegatives& n) {
  if (!is_hard(c, is_target, n)) return entry_cosine_gradient(c, is_target, row, loss);
  return entry_cosine_gradient(mapped_cosine(c, n), false, row, loss) * map_slope(c, n);
}

// Softmax statistics of a set of a row's entries (contract.PartialStats without the target terms):
// running max and sum of exp(z - max), the same sum without the target's term (op.finalize keeps a
// confident row's loss precise with it), logit sum, and the best plain cosine with its class (the
// lower class on ties).
struct RowPartial {
  float max;
  float sum_exp;
  float nontarget_sum_exp;
  float logit_sum;
  float best_cos;
  int64_t best_class;
};

ARCFACE_HD RowPartial empty_partial() { return RowPartial{-INFINITY, 0.f, 0.f, 0.f, -INFINITY, 0}; }

ARCFACE_HD bool wins(float cos_a, int64_t class_a, float cos_b, int64_t class_b) {
  return cos_a > cos_b || (cos_a == cos_b && class_a < class_b);
}

// Add one entry: a single exp per entry (online softmax).
ARCFACE_HD void add_entry(RowPartial& p, float z, float c, int64_t cls, bool is_target) {
  if (z > p.max) {
    const float rescale = expf(p.max - z);
    p.sum_exp = p.sum_exp * rescale + 1.f;
    p.nontarget_sum_exp = p.nontarget_sum_exp * rescale + (is_target ? 0.f : 1.f);
    p.max = z;
  } else {
    const float e = expf(z - p.max);
    p.sum_exp += e;
    if (!is_target) p.nontarget_sum_exp += e;
  }
  p.logit_sum += z;
  if (wins(c, cls, p.best_cos, p.best_class)) {
    p.best_cos = c;
    p.best_class = cls;
  }
}

// The statistics of the union of two disjoint sets of entries.
ARCFACE_HD RowPartial merge(const RowPartial& a, const RowPartial& b) {
  RowPartial r;
  r.max = fmaxf(a.max, b.max);
  // both empty: exp(-inf - -inf) would be NaN
  const bool empty = r.max == -INFINITY;
  const float scale_a = empty ? 0.f : expf(a.max - r.max), scale_b = empty ? 0.f : expf(b.max - r.max);
  r.sum_exp = a.sum_exp * scale_a + b.sum_exp * scale_b;
  r.nontarget_sum_exp = a.nontarget_sum_exp * scale_a + b.nontarget_sum_exp * scale_b;
  r.logit_sum = a.logit_sum + b.logit_sum;
  const bool b_wins = wins(b.best_cos, b.best_class, a.best_cos, a.best_class);
  r.best_cos = b_wins ? b.best_cos : a.best_cos;
  r.best_class = b_wins ? b.best_class : a.best_class;
  return r;
}

// The gradient entry of sub-centre column k of a class whose dcos is `dcos` (docs/design.md eq. (19)):
// dcos * rx * rw on the class's winning column `pick`, 0 on the others.
ARCFACE_HD float routed_gradient(float dcos, float rx, float rw, int k, int pick) {
  return k == pick ? dcos * rx * rw : 0.f;
}

// The tangent projection out = grad - (u . grad) u of one row, u = f v the unit row (f: the row's
// inverse norm, 0 where clamped at eps; docs/design.md eqs. (23)-(24b)), as kLanes lanes (a warp)
// compute it: lane l owns the `vec`-wide pieces l, l + kLanes, ... of the row and sums its products
// in column order (`piece_dot`), the lanes' sums are added over a fixed butterfly (every lane ends
// with the same bits: a + b == b + a), then `projection_terms` and each entry `projected_entry`.
// Explicit fmaf: the host build gives the device's bits.
constexpr int kLanes = 32;

ARCFACE_HD float piece_dot(float partial, const float* grad, const float* v, int vec) {
  for (int i = 0; i < vec; ++i) partial = fmaf(grad[i], v[i], partial);
  return partial;
}

// Per row, from dot = v . grad: along = dot f = u . grad, and coef = along f, the coefficient of v
// itself. per_row: coef is normal or along is 0 (then out = grad - coef v, one fma per entry);
// otherwise coef underflows (a row of norm past about 2^63) and the entries take u = f v (eq. (24b)).
// A NaN takes the per-entry form and propagates.
struct ProjectionTerms {
  float along, coef;
  bool per_row;
};

ARCFACE_HD ProjectionTerms projection_terms(float dot, float factor) {
  const float along = dot * factor, coef = along * factor;
  return ProjectionTerms{along, coef, fabsf(coef) >= 1.17549435e-38f || along == 0.f};
}

ARCFACE_HD float projected_entry(float grad, float v, float coef) { return fmaf(-coef, v, grad); }

// Cosine of class j of a row: the max over its K sub-centre columns of the raw dots, and the winner.
ARCFACE_HD float class_cosine(const float* dots, const float* rw, float rx, int64_t j, int k_count, int* pick) {
  // one factor rx rw (docs/design.md eq. (7a)): dots * rx alone can overflow for a huge class row
  float best = dots[j * k_count] * (rx * rw[j * k_count]);
  *pick = 0;
  for (int k = 1; k < k_count; ++k) {
    const float c = dots[j * k_count + k] * (rx * rw[j * k_count + k]);
    if (c > best || c != c) {  // a NaN propagates, as torch.max: never a finite wrong loss
      best = c;
      *pick = k;
    }
  }
  return best;
}

}  // namespace arcface_kernels
