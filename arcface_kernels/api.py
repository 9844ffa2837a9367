"""The public functional API: margin_softmax_loss and its named forms (docs/design.md section 2)."""

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from . import op
from .backends import resolve_backend
from .backends.reference import reference_loss
from .entry import prepare_loss_inputs
from .margins import CLIP_EPS
from .options import LossOptions, Margin
from .validation import boolean


class MarginLossStats(NamedTuple):
    """Per-row statistics of `return_stats=True`. They carry no gradient: a loss built on lse
    or target_cos raises when it is differentiated (README, "What is differentiable").

    lse: log-sum-exp of the margined logits (compute dtype). target_cos: cosine to the target
    class (0 on ignored rows). top1: int64 class with the largest plain cosine (lowest index on ties).
    """

    lse: Tensor
    target_cos: Tensor
    top1: Tensor


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return resolve_backend(backend, device, dtype)


class _StatsCarryNoGradient(torch.autograd.Function):
    """Passes lse and target_cos through; differentiating a loss built on them raises instead of
    giving a silent zero gradient. (Under torch.compile the stats are plain non-differentiable
    outputs: the raise would fire while the backward graph is traced.)"""

    @staticmethod
    def forward(ctx, embeddings, weight, lse, target_cos):
        return lse.view_as(lse), target_cos.view_as(target_cos)

    @staticmethod
    def backward(ctx, grad_lse, grad_target_cos):
        raise RuntimeError(
            "the return_stats outputs (lse, target_cos, top1) carry no gradient: a loss built on them "
            "cannot be differentiated. Detach them (stats.lse.detach()) to log or regularize without "
            "gradient; see README, 'What is differentiable, and autocast'."
        )


def stats_without_gradient(embeddings, weight, lse, target_cos, top1):
    """MarginLossStats whose lse and target_cos raise when a loss built on them is differentiated
    (every entry path returns its stats through this)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
            embeddings.requires_grad or weight.requires_grad):
        lse, target_cos = _StatsCarryNoGradient.apply(embeddings, weight, lse, target_cos)
    return MarginLossStats(lse, target_cos, top1)


def loss_from_options(embeddings, weight, labels, options: LossOptions, *, return_stats=False, backend="auto"):
    """margin_softmax_loss with its settings in a LossOptions (what the heads call)."""
    return_stats = boolean("return_stats", return_stats)
    inputs = prepare_loss_inputs(embeddings, weight, labels, options)
    device, dtype = embeddings.device, inputs.operand_dtype
    name = _resolve(backend, device, dtype)
    if name == "reference":
        num_classes = weight.shape[0] // options.sub_centers
        # A custom op, so that the label check also runs inside a torch.compile'd graph.
        targets = op.target_labels(inputs.labels, options.ignore_index, num_classes)
        rows, lse, target_cos, top1 = reference_loss(embeddings, weight, targets, inputs.options, dtype)
        rows = rows.to(inputs.compute_dtype)
    else:
        with op.autocast_off(device.type):
            rows, lse, target_cos, top1 = op.fused_loss_rows(
                embeddings.contiguous(), weight.contiguous(), inputs.labels.contiguous(), inputs.options, name, dtype)
    active = inputs.labels != options.ignore_index if options.reduction == "mean" else None
    loss = reduce_rows(rows, active, options.reduction)
    if return_stats:
        return loss, stats_without_gradient(embeddings, weight, lse, target_cos, top1)
    return loss


def margin_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    m1: Margin = 1.0,
    m2: Margin = 0.5,
    m3: Margin = 0.0,
    sub_centers: int = 1,
    easy_margin: bool = False,
    fallback: str = "threshold",
    clip_eps: float = CLIP_EPS,
    margin_grad: str = "exact",
    nontarget: str = "none",
    nontarget_t: float | Tensor = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
):
    """Combined-margin softmax cross-entropy without materializing the N x C logits.

    cos_ij = <x_i, w_j> / (|x_i| |w_j|), the target logit is s * phi(cos_iy) with
    phi(c) = cos(m1 * acos(c) + m2) - m3, the others s * cos_ij (or, with nontarget, s * h(cos_ij)
    where cos_ij is above the row's threshold: CurricularFace, MV-Softmax, insightface's
    filtering; docs/design.md section 3c); the loss is the cross entropy of those logits. See
    docs/design.md section 2 for every argument.

    Returns the loss (float32; float64 for float64 inputs), and with return_stats=True a (loss, MarginLossStats) pair.
    """
    settings = dict(scale=scale, m1=m1, m2=m2, m3=m3, sub_centers=sub_centers, easy_margin=easy_margin,
                    fallback=fallback, clip_eps=clip_eps, margin_grad=margin_grad, nontarget=nontarget,
                    nontarget_t=nontarget_t, label_smoothing=label_smoothing,
                    ignore_index=ignore_index, reduction=reduction)
    if torch.compiler.is_compiling() or not all(type(v) in _PLAIN_SETTINGS for v in settings.values()):
        options = LossOptions(**settings)
    else:  # validated once per distinct settings, not on every step
        options = _plain_options(**settings)
    return loss_from_options(embeddings, weight, labels, options, return_stats=return_stats, backend=backend)


# Settings of these exact types are values (hashable, immutable); tensors and numpy numbers are
# validated on every call.
_PLAIN_SETTINGS = (bool, int, float, str)


@functools.lru_cache(maxsize=64, typed=True)
def _plain_options(**settings) -> LossOptions:
    return LossOptions(**settings)


def reduce_rows(rows, active, reduction):
    """The reduction of per-row losses; `active`: the rows whose label is not ignore_index (read
    by "mean" only)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    # The mean over non-ignored rows, as F.cross_entropy; 0 (not NaN) when every row is ignored.
    return total / active.sum().clamp_min(1)


def arcface_loss(embeddings, weight, labels, *, scale=64.0, margin=0.5, **kwargs):
    """ArcFace: phi(c) = cos(theta + margin)."""
    return margin_softmax_loss(embeddings, weight, labels, scale=scale, m1=1.0, m2=margin, m3=0.0, **kwargs)


def cosface_loss(embeddings, weight, labels, *, scale=64.0, margin=0.35, **kwargs):
    """CosFace: phi(c) = c - margin."""
    return margin_softmax_loss(embeddings, weight, labels, scale=scale, m1=1.0, m2=0.0, m3=margin, **kwargs)


def sphereface_loss(embeddings, weight, labels, *, scale=64.0, margin=1.35, **kwargs):
    """SphereFace as in the ArcFace paper: phi(c) = cos(margin * theta)."""
    return margin_softmax_loss(embeddings, weight, labels, scale=scale, m1=margin, m2=0.0, m3=0.0, **kwargs)
