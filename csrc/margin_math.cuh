// The target-angle margin phi(c) and d phi / d c: the same rules and constants as
// arcface_kernels/margins.py (docs/design.md section 3). Host and device functions: the
// host build is checked against margins.py in tests/test_cuda_math_host.py.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define ARCFACE_HD __host__ __device__ __forceinline__
#else
#define ARCFACE_HD inline
#endif

namespace arcface_kernels {

constexpr float kPi = 3.14159265358979323846f;
constexpr float kSinFloor = 1e-4f;  // margins.SIN_FLOOR
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

ARCFACE_HD float phi(float cos_value, float m1, float m2, float m3, bool easy_margin) {
  const AngleTerms t = angle_terms(cos_value, m1, m2);
  float value = (m1 == 1.f && t.k >= 1.f) ? t.c - m3 - m2 * sinf(m2)  // m1 == 1 past pi
                                          : t.sign * cosf(t.angle) - 2.f * t.k - m3;
  if (easy_margin && !(t.c > 0.f)) value = t.c;
  return value;
}

// sin(x) / x, 1 at x = 0
ARCFACE_HD float sinc(float x) { return x == 0.f ? 1.f : sinf(x) / x; }

ARCFACE_HD float dphi_dcos(float cos_value, float m1, float m2, bool easy_margin, bool straight_through) {
  if (straight_through) return 1.f;
  const AngleTerms t = angle_terms(cos_value, m1, m2);
  const float theta = acosf(t.c);
  const float sin_theta = fmaxf(sqrtf(fmaxf(1.f - t.c * t.c, 0.f)), kSinFloor);
  // d/dc cos(m1 theta + m2) = m1 [cos(m2) sin(m1 theta) + sin(m2) cos(m1 theta)] / sin(theta)
  // (margins.dphi_dcos): below pi/2 sin(m1 theta) / sin(theta) = m1 sinc(m1 theta) / sinc(theta),
  // so that at c = 1 the derivative is its limit m1^2 when m2 = 0; elsewhere sin(theta) is floored.
  const float sin_ratio = theta < 0.5f * kPi ? m1 * sinc(m1 * theta) / sinc(theta) : sinf(m1 * theta) / sin_theta;
  const float nominal = t.sign * m1 * (cosf(m2) * sin_ratio + sinf(m2) * cosf(m1 * theta) / sin_theta);
  float grad = (m1 == 1.f && t.k >= 1.f) ? 1.f : nominal;
  if (easy_margin && !(t.c > 0.f)) grad = 1.f;
  return grad;
}

}  // namespace arcface_kernels
