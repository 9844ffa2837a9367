"""The `reference` backend: the margin-softmax head written plainly, materializing N x C.

It is the oracle every fused backend is tested against: normalize, cosine matrix,
max over sub-centers, margin on the target column, scale, F.cross_entropy. Autograd
does the rest, except d phi / d cos, which follows the contract (margins.dphi_dcos).
It computes in float32 (float64 for float64 inputs) and returns the input dtype.
"""

import torch
import torch.nn.functional as F

from ..dtypes import compute_dtype
from ..margins import NORM_EPS, dphi_dcos, phi
from .common import overflow_scales


class _Margin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cos, m1, m2, m3, easy_margin, straight_through):
        ctx.save_for_backward(cos, m1, m2, m3)
        ctx.flags = (easy_margin, straight_through)
        return phi(cos, m1, m2, m3, easy_margin)

    @staticmethod
    def backward(ctx, grad):
        cos, m1, m2, m3 = ctx.saved_tensors
        return grad * dphi_dcos(cos, m1, m2, m3, *ctx.flags), None, None, None, None, None


def reference_logits(embeddings, weight, labels, m1, m2, m3, *, scale, sub_centers,
                     easy_margin=False, straight_through=False):
    """The full N x C margined logits (target margin only where label >= 0) and the cosines."""
    cdt = compute_dtype(embeddings.dtype)
    # Huge rows scaled by a power of two first (exact, differentiable), as the op does for the
    # fused backends: F.normalize's squared norm would overflow.
    x = F.normalize(embeddings.to(cdt) * overflow_scales(embeddings, cdt)[:, None], dim=1, eps=NORM_EPS)
    w = F.normalize(weight.to(cdt) * overflow_scales(weight, cdt)[:, None], dim=1, eps=NORM_EPS)
    cos = x @ w.T
    if sub_centers > 1:
        cos = cos.view(cos.shape[0], weight.shape[0] // sub_centers, sub_centers).max(dim=2).values
    has_target = labels >= 0
    safe = torch.where(has_target, labels, 0)
    cos_y = cos.gather(1, safe[:, None])[:, 0]
    margined = _Margin.apply(cos_y, m1.to(cdt), m2.to(cdt), m3.to(cdt), easy_margin, straight_through)
    onehot = F.one_hot(safe, cos.shape[1]).bool() & has_target[:, None]
    logits = scale * torch.where(onehot, margined[:, None], cos)
    return logits, cos


def reference_loss(embeddings, weight, targets, options):
    """Per-row loss (0 on ignored rows), lse, target cosine and top-1 class.

    targets: int64 labels with -1 on ignored rows (validation.target_labels); options with
    (N,) margins (LossOptions.for_rows)."""
    active = targets >= 0
    labels = torch.where(active, targets, 0)
    logits, cos = reference_logits(embeddings, weight, targets, options.m1, options.m2, options.m3,
                                   scale=options.scale, sub_centers=options.sub_centers,
                                   easy_margin=options.easy_margin, straight_through=options.straight_through)
    loss = F.cross_entropy(logits, torch.where(active, targets, -100), ignore_index=-100,
                           label_smoothing=options.label_smoothing, reduction="none")
    with torch.no_grad():
        lse = torch.logsumexp(logits, dim=1)
        cos_y = cos.gather(1, labels[:, None])[:, 0]
        target_cos = torch.where(active, cos_y, 0.0)
        top1 = cos.argmax(dim=1)
    return loss, lse, target_cos, top1
