// The per-entry and per-row arithmetic of the epilogue kernels (forward.cu, backward.cu): the
// logit and the loss gradient of one (row, class) entry, and the online softmax statistics of a
// row's entries. Host and device functions: the host build is checked against the Python rules
// in tests/test_cuda_math_host.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "margin_math.cuh"

namespace arcface_kernels {

// Per-row inputs of the loss: margins, and in backward the row's lse and incoming gradient.
struct RowTerms {
  float m1, m2, m3;
  float lse;   // backward only
  float grad;  // backward only; 0 on ignored rows
};

struct LossSettings {
  float scale;
  float smoothing;            // label smoothing eps
  float smoothing_per_class;  // eps / C
  bool easy_margin;
  bool straight_through;
};

// z = s * cos, with the margin on the target (docs/design.md section 3).
ARCFACE_HD float entry_logit(float c, bool is_target, const RowTerms& row, const LossSettings& loss) {
  return loss.scale * (is_target ? phi(c, row.m1, row.m2, row.m3, loss.easy_margin) : c);
}

// d loss / d cos of one entry (docs/design.md section 5): dz = g (p - (1 - eps) [j = y] - eps / C),
// the target through expm1 (never 1 - p in low precision) and dphi/dc.
ARCFACE_HD float entry_cosine_gradient(float c, bool is_target, const RowTerms& row, const LossSettings& loss) {
  const float z = entry_logit(c, is_target, row, loss);
  const float dz = is_target ? (expm1f(z - row.lse) + loss.smoothing - loss.smoothing_per_class) *
                                   dphi_dcos(c, row.m1, row.m2, loss.easy_margin, loss.straight_through)
                             : expf(z - row.lse) - loss.smoothing_per_class;
  return loss.scale * row.grad * dz;
}

// Softmax statistics of a set of a row's entries (contract.PartialStats without the target terms):
// running max and sum of exp(z - max), logit sum, and the best plain cosine with its class (the
// lower class on ties).
struct RowPartial {
  float max;
  float sum_exp;
  float logit_sum;
  float best_cos;
  int64_t best_class;
};

ARCFACE_HD RowPartial empty_partial() { return RowPartial{-INFINITY, 0.f, 0.f, -INFINITY, 0}; }

ARCFACE_HD bool wins(float cos_a, int64_t class_a, float cos_b, int64_t class_b) {
  return cos_a > cos_b || (cos_a == cos_b && class_a < class_b);
}

// Add one entry: a single exp per entry (online softmax).
ARCFACE_HD void add_entry(RowPartial& p, float z, float c, int64_t cls) {
  if (z > p.max) {
    p.sum_exp = p.sum_exp * expf(p.max - z) + 1.f;
    p.max = z;
  } else {
    p.sum_exp += expf(z - p.max);
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
  r.sum_exp = r.max == -INFINITY ? 0.f : a.sum_exp * expf(a.max - r.max) + b.sum_exp * expf(b.max - r.max);
  r.logit_sum = a.logit_sum + b.logit_sum;
  const bool b_wins = wins(b.best_cos, b.best_class, a.best_cos, a.best_class);
  r.best_cos = b_wins ? b.best_cos : a.best_cos;
  r.best_class = b_wins ? b.best_class : a.best_class;
  return r;
}

// Cosine of class j of a row: the max over its K sub-centre columns of the raw dots, and the winner.
ARCFACE_HD float class_cosine(const float* dots, const float* rw, float rx, int64_t j, int k_count, int* pick) {
  float best = dots[j * k_count] * rx * rw[j * k_count];
  *pick = 0;
  for (int k = 1; k < k_count; ++k) {
    const float c = dots[j * k_count + k] * rx * rw[j * k_count + k];
    if (c > best) {
      best = c;
      *pick = k;
    }
  }
  return best;
}

}  // namespace arcface_kernels
