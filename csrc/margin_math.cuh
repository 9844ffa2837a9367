// The target-angle margin phi(c) of the forward and its slope dphi/dc: the same rules and
// constants as arcface_kernels/margins.py (docs/design.md sections 3-5). The CUDA kernels need no
// slope (the op computes the target's dcos once per row, op.target_cosine_gradient); the CPU
// extension's row finish (cpu_epilogue.cpp, finish_rows) takes both. Host and device functions:
// the host build is checked against margins.py in tests/test_cuda_math_host.py.
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
constexpr float kSinFloor = 1e-4f;  // margins.SIN_FLOOR

struct AngleTerms {
  float c, theta, angle, k, sign;
};

ARCFACE_HD AngleTerms angle_terms(float cos_value, float m1, float m2) {
  AngleTerms t;
  t.c = fminf(fmaxf(cos_value, -1.f), 1.f);
  t.theta = acosf(t.c);
  t.angle = m1 * t.theta + m2;
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

// torch.sinc: sin(pi x) / (pi x), 1 at 0.
ARCFACE_HD float sinc(float x) {
  if (x == 0.f) return 1.f;
  const float product = kPi * x;
  return sinf(product) / product;
}

// d phi / d c, margins.dphi_dcos's rules (its docstring): m1 sin(m1 theta + m2) / sin(theta) with
// sin(m1 theta) / sin(theta) as m1 sinc(m1 theta) / sinc(theta) below pi / 2, sin(theta) floored at
// kSinFloor elsewhere; 1 under the m1 == 1 fallback past pi and where easy_margin makes phi = c;
// with kClip, 0 where the clip holds the angle at a bound.
template <bool kClip = false>
ARCFACE_HD float dphi_dcos(float cos_value, float m1, float m2, bool easy_margin, bool straight_through,
                           float clip_eps = 0.f) {
  if (straight_through) return 1.f;
  const AngleTerms t = angle_terms(cos_value, m1, m2);
  const float sin_theta = fmaxf(sqrtf(fmaxf(1.f - t.c * t.c, 0.f)), kSinFloor);
  const float sin_ratio = t.theta < kPi / 2.f ? m1 * sinc(m1 * t.theta / kPi) / sinc(t.theta / kPi)
                                              : sinf(m1 * t.theta) / sin_theta;
  const float nominal = t.sign * m1 * (cosf(m2) * sin_ratio + sinf(m2) * cosf(m1 * t.theta) / sin_theta);
  float grad;
  if (kClip) {
    grad = (t.angle >= clip_eps && t.angle <= kPi - clip_eps) ? nominal : 0.f;
  } else {
    grad = (m1 == 1.f && t.k >= 1.f) ? 1.f : nominal;
  }
  if (easy_margin && !(t.c > 0.f)) grad = 1.f;
  return grad;
}

}  // namespace arcface_kernels
