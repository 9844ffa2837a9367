"""The target-angle margin phi(c), its derivative dphi/dc, and the numeric rules every
backend shares (docs/design.md sections 3-5).

phi(c) = cos(m1 * theta + m2) - m3 with theta = acos(c), plus the contract's rules
past the point where cos(m1 * theta + m2) stops decreasing. Every backend uses
these exact rules; the constants below are the ones the kernels copy.
"""

import math

import torch

# F.normalize's epsilon: a vector's norm is max(|v|, NORM_EPS).
NORM_EPS = 1e-12
# sin(theta) is floored at SIN_FLOOR in dphi/dc so that c = +-1 gives a finite gradient.
SIN_FLOOR = 1e-4


def phi(cos, m1, m2, m3, easy_margin=False):
    """The margined target cosine for cosines `cos` and per-row margins (broadcastable)."""
    c = cos.clamp(-1.0, 1.0)
    angle = m1 * torch.acos(c) + m2
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


def dphi_dcos(cos, m1, m2, m3, easy_margin=False, straight_through=False):
    """d phi / d cos, with sin(theta) floored at SIN_FLOOR; 1 where a rule makes phi = c + const."""
    c = cos.clamp(-1.0, 1.0)
    if straight_through:
        return torch.ones_like(c)
    angle = m1 * torch.acos(c) + m2
    k = torch.floor(angle / math.pi).clamp_min(0.0)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    sin_theta = torch.sqrt((1.0 - c * c).clamp_min(0.0)).clamp_min(SIN_FLOOR)
    # d/dc cos(m1*acos(c) + m2) = m1 * sin(m1*theta + m2) / sin(theta)
    nominal = sign * m1 * torch.sin(angle) / sin_theta
    unit_m1 = torch.as_tensor(m1 == 1.0, device=c.device)
    grad = torch.where(unit_m1 & (k >= 1.0), torch.ones_like(c), nominal)
    if easy_margin:
        grad = torch.where(c > 0, grad, torch.ones_like(c))
    return grad
