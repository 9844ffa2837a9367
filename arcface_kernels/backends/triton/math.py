"""Scalar math of the margin (forward only) as @triton.jit helpers: the same rules and constants as
arcface_kernels/margins.py (docs/design.md section 3), written with what both Triton's compiler
and its CPU interpreter provide (no libdevice)."""

import triton
import triton.language as tl

PI: tl.constexpr = tl.constexpr(3.141592653589793)


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
def phi(cos, m1, m2, m3, EASY_MARGIN: tl.constexpr, CLIP_EPS: tl.constexpr):
    """The margined target cosine (margins.phi). Only the forward needs it: backward takes the
    target's dcos from the op (op.target_cosine_gradient), so no dphi/dc lives in a kernel.
    CLIP_EPS > 0: fallback="clip" (eq. (3a)), the angle clipped into [CLIP_EPS, pi - CLIP_EPS];
    0: the threshold rules (eqs. (3)-(4)). A constexpr: each path compiles only its own rule."""
    c = tl.minimum(tl.maximum(cos, -1.0), 1.0)
    angle = m1 * acos(c) + m2
    if CLIP_EPS > 0:
        value = tl.cos(tl.minimum(tl.maximum(angle, CLIP_EPS), PI - CLIP_EPS)) - m3
    else:
        k = tl.maximum(tl.floor(angle / PI), 0.0)
        sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(k / 2.0))
        sphere_rule = sign * tl.cos(angle) - 2.0 * k - m3
        arc_fallback = c - m3 - m2 * tl.sin(m2)
        value = tl.where((m1 == 1.0) & (k >= 1.0), arc_fallback, sphere_rule)
    if EASY_MARGIN:
        value = tl.where(c > 0, value, c)
    return value
