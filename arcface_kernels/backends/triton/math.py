"""Scalar math of the margin as @triton.jit helpers: the same rules and constants as
arcface_kernels/margins.py (docs/design.md section 3), written with what both Triton's compiler
and its CPU interpreter provide (no libdevice)."""

import triton
import triton.language as tl

from ...margins import SIN_FLOOR as _SIN_FLOOR

PI: tl.constexpr = tl.constexpr(3.141592653589793)
SIN_FLOOR: tl.constexpr = tl.constexpr(_SIN_FLOOR)


@triton.jit
def acos(c):
    """acos on [-1, 1], absolute error below 3e-8 (Abramowitz & Stegun 4.4.46)."""
    a = tl.abs(c)
    p = -0.0012624911
    p = p * a + 0.0066700901
    p = p * a - 0.0170881256
    p = p * a + 0.0308918810
    p = p * a - 0.0501743046
    p = p * a + 0.0889789874
    p = p * a - 0.2145988016
    p = p * a + 1.5707963050
    r = tl.sqrt(tl.maximum(1.0 - a, 0.0)) * p
    return tl.where(c < 0, PI - r, r)


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan's trick)."""
    u = tl.exp(x)
    exact = (u == 1.0) | (u == 0.0)
    ratio = (u - 1.0) * x / tl.log(tl.where(exact, 2.0, u))
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, ratio))


@triton.jit
def sinc(x):
    """sin(x) / x, 1 at x = 0 (no division by zero in the unselected branch)."""
    safe = tl.where(x == 0.0, 1.0, x)
    return tl.where(x == 0.0, 1.0, tl.sin(safe) / safe)


@triton.jit
def _angle_terms(cos, m1, m2):
    c = tl.minimum(tl.maximum(cos, -1.0), 1.0)
    theta = acos(c)
    angle = m1 * theta + m2
    k = tl.maximum(tl.floor(angle / PI), 0.0)
    sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(k / 2.0))
    return c, theta, angle, k, sign


@triton.jit
def phi(cos, m1, m2, m3, EASY_MARGIN: tl.constexpr):
    """The margined target cosine (margins.phi)."""
    c, theta, angle, k, sign = _angle_terms(cos, m1, m2)
    sphere_rule = sign * tl.cos(angle) - 2.0 * k - m3
    arc_fallback = c - m3 - m2 * tl.sin(m2)
    value = tl.where((m1 == 1.0) & (k >= 1.0), arc_fallback, sphere_rule)
    if EASY_MARGIN:
        value = tl.where(c > 0, value, c)
    return value


@triton.jit
def dphi_dcos(cos, m1, m2, m3, EASY_MARGIN: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr):
    """d phi / d cos with sin(theta) floored at SIN_FLOOR (margins.dphi_dcos)."""
    c, theta, angle, k, sign = _angle_terms(cos, m1, m2)
    if STRAIGHT_THROUGH:
        grad = c * 0.0 + 1.0
    else:
        sin_theta = tl.maximum(tl.sqrt(tl.maximum(1.0 - c * c, 0.0)), SIN_FLOOR)
        # margins.dphi_dcos: below pi/2, sin(m1 theta) / sin(theta) = m1 sinc(m1 theta) / sinc(theta),
        # so that at c = 1 the derivative is its limit m1^2 when m2 = 0; elsewhere sin(theta) is floored
        sin_ratio = tl.where(theta < 0.5 * PI, m1 * sinc(m1 * theta) / sinc(theta), tl.sin(m1 * theta) / sin_theta)
        nominal = sign * m1 * (tl.cos(m2) * sin_ratio + tl.sin(m2) * tl.cos(m1 * theta) / sin_theta)
        grad = tl.where((m1 == 1.0) & (k >= 1.0), 1.0, nominal)
        if EASY_MARGIN:
            grad = tl.where(c > 0, grad, 1.0)
    return grad
