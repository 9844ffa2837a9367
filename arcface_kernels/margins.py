"""The target-angle margin phi(c), its derivative dphi/dc, and the numeric rules every
backend shares (docs/design.md sections 3-5).

phi(c) = cos(m1 * theta + m2) - m3 with theta = acos(c), plus the contract's rules
past the point where cos(m1 * theta + m2) stops decreasing (fallback="threshold"), or AdaFace's
clip of the angle into [eps, pi - eps] (fallback="clip"). Every backend uses these exact rules;
the forward kernels copy phi (and its constants), while dphi/dc and the margins' own slopes
dphi/dm2, dphi/dm3 are evaluated in Python only here, once per row by the op
(op.target_cosine_gradient, op.margin_gradients) and by the reference; csrc/margin_math.cuh holds
phi and dphi/dc for C++ (the CPU extension's row finish, csrc/cpu_row_blocks.cpp), checked against these.
"""

import math

import torch

# F.normalize's epsilon: a vector's norm is max(|v|, NORM_EPS).
NORM_EPS = 1e-12
# sin(theta) is floored at SIN_FLOOR in dphi/dc where the true derivative is unbounded (dphi_dcos).
SIN_FLOOR = 1e-4
# The rules past the valid range (docs/design.md section 3): today's eqs. (3)-(4), or AdaFace's clip (3a).
FALLBACKS = ("threshold", "clip")
# AdaFace's eps: the clipped angle stays in [CLIP_EPS, pi - CLIP_EPS] (mk-minchul/AdaFace head.py).
CLIP_EPS = 1e-3


def _within_clip(angle, clip):
    """Where eq. (3a) leaves the angle as it is (its slopes are those of eq. (2) there, 0 elsewhere)."""
    return (angle >= clip) & (angle <= math.pi - clip)


def phi(cos, m1, m2, m3, easy_margin=False, clip=None):
    """The margined target cosine for cosines `cos` and per-row margins (broadcastable).
    clip: None for the threshold rules (eqs. (3)-(4)), else AdaFace's eps (eq. (3a))."""
    c = cos.clamp(-1.0, 1.0)
    angle = m1 * torch.acos(c) + m2
    if clip is not None:
        value = torch.cos(angle.clamp(clip, math.pi - clip)) - m3
    else:
        # k = floor(angle / pi) >= 1 only past pi: SphereFace's monotone extension.
        k = torch.floor(angle / math.pi).clamp_min(0.0)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        sphere_rule = sign * torch.cos(angle) - 2.0 * k - m3
        # m1 == 1: past pi use c - m3 - m2 * sin(m2) (insightface / pytorch-metric-learning).
        arc_fallback = c - m3 - m2 * torch.sin(torch.as_tensor(m2, dtype=c.dtype, device=c.device))
        unit_m1 = torch.as_tensor(m1 == 1.0, device=c.device)
        value = torch.where(unit_m1 & (k >= 1.0), arc_fallback, sphere_rule)
    if easy_margin:
        value = torch.where(c > 0, value, c)
    return value


def dphi_dcos(cos, m1, m2, m3, easy_margin=False, straight_through=False, clip=None):
    """d phi / d cos; 1 where a rule makes phi = c + const, 0 where the clip (eq. (3a)) holds the
    angle at a bound.

    d/dc cos(m1 theta + m2) = m1 sin(m1 theta + m2) / sin(theta)
                            = m1 [cos(m2) sin(m1 theta) / sin(theta) + sin(m2) cos(m1 theta) / sin(theta)].
    The first ratio tends to m1 as theta -> 0 and is computed as m1 sinc(m1 theta) / sinc(theta)
    there, so that at c = 1 the derivative is its limit m1^2 when m2 = 0 (CosFace, SphereFace,
    plain softmax). Elsewhere sin(theta) is floored at SIN_FLOOR: at c = 1 with m2 != 0, and at
    c = -1 with m1 != 1, the true derivative is unbounded, and the floor gives a finite one
    (m1^2 cos(m2) + m1 sin(m2) / SIN_FLOOR at c = 1). At c = -1 with m1 = 1 the fallback rule
    applies and the derivative is 1, its limit.
    """
    c = cos.clamp(-1.0, 1.0)
    if straight_through:
        return torch.ones_like(c)
    theta = torch.acos(c)
    angle = m1 * theta + m2
    k = torch.floor(angle / math.pi).clamp_min(0.0)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    sin_theta = torch.sqrt((1.0 - c * c).clamp_min(0.0)).clamp_min(SIN_FLOOR)
    # torch.sinc(t) = sin(pi t) / (pi t): sin(m1 theta) / sin(theta) = m1 sinc(m1 theta / pi) / sinc(theta / pi)
    sin_ratio = torch.where(theta < math.pi / 2, m1 * torch.sinc(m1 * theta / math.pi) / torch.sinc(theta / math.pi),
                            torch.sin(m1 * theta) / sin_theta)
    m2 = torch.as_tensor(m2, dtype=c.dtype, device=c.device)
    nominal = sign * m1 * (torch.cos(m2) * sin_ratio + torch.sin(m2) * torch.cos(m1 * theta) / sin_theta)
    if clip is not None:  # inside the bounds k = 0 and sign = 1: eq. (5); at a bound phi is constant
        grad = torch.where(_within_clip(angle, clip), nominal, torch.zeros_like(c))
    else:
        unit_m1 = torch.as_tensor(m1 == 1.0, device=c.device)
        grad = torch.where(unit_m1 & (k >= 1.0), torch.ones_like(c), nominal)
    if easy_margin:
        grad = torch.where(c > 0, grad, torch.ones_like(c))
    return grad


def dphi_dmargins(cos, m1, m2, easy_margin=False, clip=None):
    """(d phi / d m2, d phi / d m3) per row (docs/design.md eq. (5a)): the slopes the margins'
    own gradient needs (op.margin_gradients). d phi / d m2 is -sin(a) where eq. (2) holds,
    -(-1)^k sin(a) under eq. (4), -(sin(m2) + m2 cos(m2)) under eq. (3), 0 where the clip holds
    the angle at a bound; d phi / d m3 = -1. Both are 0 where easy_margin replaces phi by c."""
    c = cos.clamp(-1.0, 1.0)
    angle = m1 * torch.acos(c) + m2
    m2 = torch.as_tensor(m2, dtype=c.dtype, device=c.device)
    if clip is not None:
        d_m2 = torch.where(_within_clip(angle, clip), -torch.sin(angle), torch.zeros_like(c))
    else:
        k = torch.floor(angle / math.pi).clamp_min(0.0)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        unit_m1 = torch.as_tensor(m1 == 1.0, device=c.device)
        d_m2 = torch.where(unit_m1 & (k >= 1.0), -(torch.sin(m2) + m2 * torch.cos(m2)), -sign * torch.sin(angle))
    d_m3 = -torch.ones_like(c)
    if easy_margin:
        d_m2 = torch.where(c > 0, d_m2, 0.0)
        d_m3 = torch.where(c > 0, d_m3, 0.0)
    return d_m2, d_m3
