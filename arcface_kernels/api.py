"""The public functional API: margin_softmax_loss and its named forms (docs/design.md section 2)."""

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import op
from .backends import resolve_backend
from .backends.reference import reference_loss
from .dtypes import compute_dtype
from .options import LossOptions, Margin
from .validation import check_tensors


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


def _autocast(embeddings, weight):
    """Under torch.autocast, embeddings and weight in the autocast dtype (float64 is left alone,
    as autocast does); autograd casts each gradient back to its input's dtype."""
    device_type = embeddings.device.type
    if not torch.is_autocast_enabled(device_type):
        return embeddings, weight
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if t.dtype == torch.float64 else t.to(dtype) for t in (embeddings, weight)]
    return tuple(cast)


def _refuse_unsupported_autodiff(embeddings, weight):
    """torch.func transforms and forward-mode AD would otherwise get a silent zero tangent or an
    obscure error: the op registers reverse-mode autograd only."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise NotImplementedError(
            "margin_softmax_loss does not support torch.func transforms (grad, vjp, jvp, vmap, jacrev, "
            "jacfwd, hessian): its custom op has reverse-mode autograd only. Use loss.backward() or "
            "torch.autograd.grad."
        )
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None
                                               for t in (embeddings, weight)):
        raise NotImplementedError(
            "margin_softmax_loss does not support forward-mode AD (torch.autograd.forward_ad): "
            "it registers reverse-mode autograd only. Use loss.backward() or torch.autograd.grad."
        )


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


def _stats(embeddings, weight, lse, target_cos, top1):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
            embeddings.requires_grad or weight.requires_grad):
        lse, target_cos = _StatsCarryNoGradient.apply(embeddings, weight, lse, target_cos)
    return MarginLossStats(lse, target_cos, top1)


def loss_from_options(embeddings, weight, labels, options: LossOptions, *, return_stats=False, backend="auto"):
    """margin_softmax_loss with its settings in a LossOptions (what the heads call)."""
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _refuse_unsupported_autodiff(embeddings, weight)
    embeddings, weight = _autocast(embeddings, weight)
    check_tensors(embeddings, weight, labels, options.sub_centers)
    device, dtype = embeddings.device, embeddings.dtype
    rows_options = options.for_rows(embeddings.shape[0], device, compute_dtype(dtype))
    name = _resolve(backend, device, dtype)
    if name == "reference":
        num_classes = weight.shape[0] // options.sub_centers
        # A custom op, so that the label check also runs inside a torch.compile'd graph.
        targets = op.target_labels(labels, options.ignore_index, num_classes)
        rows, lse, target_cos, top1 = reference_loss(embeddings, weight, targets, rows_options, dtype)
        rows = rows.to(compute_dtype(dtype))
    else:
        with torch.autocast(device.type, enabled=False):
            rows, lse, target_cos, top1 = op.fused_loss_rows(
                embeddings.contiguous(), weight.contiguous(), labels.contiguous(), rows_options, name, dtype)
    loss = _reduce(rows, labels != options.ignore_index, options.reduction)
    if return_stats:
        return loss, _stats(embeddings, weight, lse, target_cos, top1)
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
    margin_grad: str = "exact",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
):
    """Combined-margin softmax cross-entropy without materializing the N x C logits.

    cos_ij = <x_i, w_j> / (|x_i| |w_j|), the target logit is s * phi(cos_iy) with
    phi(c) = cos(m1 * acos(c) + m2) - m3, the others s * cos_ij; the loss is the cross
    entropy of those logits. See docs/design.md section 2 for every argument.

    Returns the loss (float32; float64 for float64 inputs), and with return_stats=True a (loss, MarginLossStats) pair.
    """
    options = LossOptions(scale=scale, m1=m1, m2=m2, m3=m3, sub_centers=sub_centers, easy_margin=easy_margin,
                          margin_grad=margin_grad, label_smoothing=label_smoothing, ignore_index=ignore_index,
                          reduction=reduction)
    return loss_from_options(embeddings, weight, labels, options, return_stats=return_stats, backend=backend)


def _reduce(rows, active, reduction):
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
