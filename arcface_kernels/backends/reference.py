"""The `reference` backend: the margin-softmax head written plainly, materializing N x C.

It is the oracle every fused backend is tested against: normalize, cosine matrix,
max over sub-centers, margin on the target column, scale, cross-entropy (in the form that keeps a
confident row's precision, cross_entropy_rows). Autograd does the rest, except d phi / d cos,
which follows the contract (margins.dphi_dcos). It computes in float32 (float64 for float64
operands) on operands rounded to the operand dtype, as the fused op does, and returns each
gradient in its input's dtype.
"""

import math

import torch
import torch.nn.functional as F

from ..dtypes import compute_dtype
from ..margins import NORM_EPS, dphi_dcos, dphi_dmargins, phi
from ..negatives import hard_negatives, is_hard, map_cosines
from .common import overflow_scales


class _Margin(torch.autograd.Function):
    """phi with the contract's dphi/dc, and dphi/dm2, dphi/dm3 for per-row margins that require
    grad (margins.dphi_dmargins; m1 carries no gradient)."""

    @staticmethod
    def forward(ctx, cos, m1, m2, m3, easy_margin, straight_through, clip):
        ctx.save_for_backward(cos, m1, m2, m3)
        ctx.flags = (easy_margin, straight_through, clip)
        return phi(cos, m1, m2, m3, easy_margin, clip)

    @staticmethod
    def backward(ctx, grad):
        cos, m1, m2, m3 = ctx.saved_tensors
        easy_margin, straight_through, clip = ctx.flags
        d_cos = grad * dphi_dcos(cos, m1, m2, m3, easy_margin, straight_through, clip)
        d_m2 = d_m3 = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            d_m2, d_m3 = (grad * d for d in dphi_dmargins(cos, m1, m2, easy_margin, clip))
        return d_cos, None, d_m2, d_m3, None, None, None


class _RoundTo(torch.autograd.Function):
    """v rounded to the operand dtype, held in the compute dtype; the gradient reaches v unrounded
    (straight through), in v's own dtype: a float32 master weight gets the float32 gradient of the
    function of its rounded values, as the fused op gives it (docs/design.md section 2, "Dtypes")."""

    @staticmethod
    def forward(ctx, v, operand_dtype, compute):
        ctx.dtype = v.dtype
        return v.to(operand_dtype).to(compute)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None, None


class _Cosines(torch.autograd.Function):
    """x @ w.T whose backward runs with autocast off: loss.backward() may be called inside the
    autocast region, where mm's backward would recast its operands to the autocast dtype."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            return grad @ w, grad.T @ x


def reference_logits(x, w, labels, m1, m2, m3, *, scale, sub_centers, easy_margin=False, straight_through=False,
                     clip=None, nontarget="none", nontarget_t=None):
    """The full N x C margined logits (target margin only where label >= 0, hard non-targets
    remapped by the non-target epilogue, eq. (N1)) and the cosines of rows x, w already in the
    compute dtype."""
    cdt = x.dtype
    # Huge rows scaled by a power of two first (exact, differentiable), as the op does for the
    # fused backends: F.normalize's squared norm would overflow.
    x = F.normalize(x * overflow_scales(x.detach(), cdt)[:, None], dim=1, eps=NORM_EPS)
    w = F.normalize(w * overflow_scales(w.detach(), cdt)[:, None], dim=1, eps=NORM_EPS)
    cos = _Cosines.apply(x, w)
    if sub_centers > 1:
        cos = cos.view(cos.shape[0], w.shape[0] // sub_centers, sub_centers).max(dim=2).values
    has_target = labels >= 0
    safe = torch.where(has_target, labels, 0)
    cos_y = cos.gather(1, safe[:, None])[:, 0]
    margined = _Margin.apply(cos_y, m1.to(cdt), m2.to(cdt), m3.to(cdt), easy_margin, straight_through, clip)
    onehot = F.one_hot(safe, cos.shape[1]).bool() & has_target[:, None]
    others = cos
    if nontarget != "none":  # the mask and t carry no gradient (negatives.py)
        hard = hard_negatives(nontarget, nontarget_t.detach(), torch.where(has_target, cos_y.detach(), 0.0), has_target,
                              m1.to(cdt), m2.to(cdt), m3.to(cdt))
        others = map_cosines(cos, is_hard(cos.detach(), hard.threshold, onehot), hard.coeffs)
    logits = scale * torch.where(onehot, margined[:, None], others)
    return logits, cos


def cross_entropy_rows(logits, targets, label_smoothing):
    """F.cross_entropy's per-row loss (0 where the target is -1), written so that a
    well-classified row keeps its relative precision in value and gradient (docs/design.md eq.
    (12a)): lse - z_y = log(1 + exp(logsumexp_{j != y}(z_j - z_y))), whose derivative in z_y is
    -sigmoid(...) = p_y - 1 without cancellation; smoothing adds eps (z_y - mean_j z_j)."""
    active = targets >= 0
    safe = torch.where(active, targets, 0)
    z_y = logits.gather(1, safe[:, None])[:, 0]
    shifted = logits - z_y[:, None]
    if logits.shape[1] > 1:
        others = shifted.masked_fill(F.one_hot(safe, logits.shape[1]).bool(), -math.inf)
        margin = torch.logsumexp(others, dim=1)
        gap = torch.logaddexp(torch.zeros_like(margin), margin)  # softplus, without F.softplus' threshold
    else:
        gap = shifted[:, 0]  # the target is the only class: 0, with gradient 0
    loss = gap + label_smoothing * (z_y - logits.mean(dim=1)) if label_smoothing else gap
    return torch.where(active, loss, 0.0)


def reference_loss(embeddings, weight, targets, options, operand_dtype):
    """Per-row loss (0 on ignored rows), lse, target cosine and top-1 class, in the compute dtype
    of operand_dtype (float32; float64 for float64), whatever autocast is active.

    embeddings, weight: as the user holds them; both are rounded to operand_dtype (the autocast
    dtype, or the inputs' own) and each gets its gradient in its own dtype (_RoundTo). targets:
    int64 labels with -1 on ignored rows (validation.target_labels); options with (N,) margins
    (LossOptions.for_rows)."""
    cdt = compute_dtype(operand_dtype)
    with torch.autocast(embeddings.device.type, enabled=False):
        x = _RoundTo.apply(embeddings, operand_dtype, cdt)
        w = _RoundTo.apply(weight, operand_dtype, cdt)
        logits, cos = reference_logits(x, w, targets, options.m1, options.m2, options.m3, scale=options.scale,
                                       sub_centers=options.sub_centers, easy_margin=options.easy_margin,
                                       straight_through=options.straight_through, clip=options.clip,
                                       nontarget=options.nontarget, nontarget_t=options.nontarget_t)
        loss = cross_entropy_rows(logits, targets, options.label_smoothing)
        with torch.no_grad():
            lse = torch.logsumexp(logits, dim=1)
            cos_y = cos.gather(1, torch.where(targets >= 0, targets, 0)[:, None])[:, 0]
            target_cos = torch.where(targets >= 0, cos_y, 0.0)
            top1 = cos.argmax(dim=1)
    return loss, lse, target_cos, top1
