// The target-angle margin phi(c) of the forward: the same rules and constants as
// arcface_kernels/margins.py (docs/design.md section 3). Backward needs no margin math: the op
// computes the target's dcos once per row (op.target_cosine_gradient). Host and device
// functions: the host build is checked against margins.py in tests/test_cuda_math_host.py.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define ARCFACE_HD __host__ __device__ __forceinline__
#else
#define ARCFACE_HD inline
#endif

namespace arcface_kernels {

constexpr float kPi = 3.14159265358979323846f;
constexpr float kNormEps = 1e-12f;  // margins.NORM_EPS

struct AngleTerms {
  float c, angle, k, sign;
};

ARCFACE_HD AngleTerms angle_terms(float cos_value, float m1, float m2) {
  AngleTerms t;
  t.c = fminf(fmaxf(cos_value, -1.f), 1.f);
  t.angle = m1 * acosf(t.c) + m2;
  // k = floor(angle / pi) >= 1 only past pi: SphereFace's monotone extension
  t.k = fmaxf(floorf(t.angle / kPi), 0.f);
  t.sign = 1.f - 2.f * (t.k - 2.f * floorf(0.5f * t.k));
  return t;
}

// kClip: fallback="clip" (docs/design.md eq. (3a)), AdaFace's angle clipped into
// [clip_eps, pi - clip_eps]; false: the threshold rules (eqs. (3)-(4)). A template flag, so the
// plain path compiles only its own rule.
template <bool kClip = false>
ARCFACE_HD float phi(float cos_value, float m1, float m2, float m3, bool easy_margin, float clip_eps = 0.f) {
  const AngleTerms t = angle_terms(cos_value, m1, m2);
  float value;
  if (kClip) {
    value = cosf(fminf(fmaxf(t.angle, clip_eps), kPi - clip_eps)) - m3;
  } else {
    value = (m1 == 1.f && t.k >= 1.f) ? t.c - m3 - m2 * sinf(m2)  // m1 == 1 past pi
                                      : t.sign * cosf(t.angle) - 2.f * t.k - m3;
  }
  if (easy_margin && !(t.c > 0.f)) value = t.c;
  return value;
}

}  // namespace arcface_kernels
