"""The public functional API: margin_softmax_loss and its named forms (DESIGN.md section 2)."""

from typing import NamedTuple, Union

import torch
from torch import Tensor

from . import op
from .reference import reference_loss
from .registry import resolve_backend

Margin = Union[float, Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_MARGIN_GRADS = ("exact", "straight_through")


class MarginLossStats(NamedTuple):
    """Per-row statistics of `return_stats=True` (none of them carries a gradient).

    lse: float32 log-sum-exp of the margined logits. target_cos: float32 cosine to the
    target class (0 on ignored rows). top1: int64 class with the largest plain cosine.
    """

    lse: Tensor
    target_cos: Tensor
    top1: Tensor


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device)


def check_inputs(embeddings, weight, labels, sub_centers, reduction, margin_grad, label_smoothing, scale):
    for name, t in (("embeddings", embeddings), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (C * sub_centers, D), got shape {tuple(weight.shape)}")
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings and weight must share D: embeddings {tuple(embeddings.shape)}, weight {tuple(weight.shape)}"
        )
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings and weight must have D >= 1")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be 1-D with N={embeddings.shape[0]} entries, got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if embeddings.dtype != weight.dtype:
        raise TypeError(
            f"embeddings ({embeddings.dtype}) and weight ({weight.dtype}) must have the same dtype "
            "(or run under torch.autocast)"
        )
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(
            f"embeddings, weight and labels must be on one device, got "
            f"{embeddings.device}, {weight.device}, {labels.device}"
        )
    if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
        raise ValueError(f"sub_centers must be a positive int, got {sub_centers!r}")
    if weight.shape[0] == 0 or weight.shape[0] % sub_centers:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, which is not a positive multiple of sub_centers={sub_centers}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if margin_grad not in _MARGIN_GRADS:
        raise ValueError(f"margin_grad must be one of {_MARGIN_GRADS}, got {margin_grad!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if isinstance(scale, Tensor) or not float(scale) > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")


def row_margin(name, value, n, device):
    """A margin as a float32 (N,) tensor; a float is broadcast."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name} as a tensor must have shape ({n},), got {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")
        return value.detach().float().contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or an (N,) tensor, got {type(value).__name__}")
    return torch.full((n,), float(value), dtype=torch.float32, device=device)


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
    entropy of those logits. See DESIGN.md section 2 for every argument.

    Returns the loss (float32; float64 for float64 inputs), and with return_stats=True a (loss, MarginLossStats) pair.
    """
    check_inputs(embeddings, weight, labels, sub_centers, reduction, margin_grad, label_smoothing, scale)
    device = embeddings.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        embeddings, weight = embeddings.to(dtype), weight.to(dtype)
    n = embeddings.shape[0]
    margins = [row_margin(name, v, n, device) for name, v in (("m1", m1), ("m2", m2), ("m3", m3))]
    labels = labels.long()
    name = _resolve(backend, device)
    flags = dict(scale=float(scale), sub_centers=sub_centers, easy_margin=bool(easy_margin),
                 straight_through=margin_grad == "straight_through",
                 label_smoothing=float(label_smoothing), ignore_index=int(ignore_index))
    if name == "reference":
        if not torch.compiler.is_compiling():
            op.target_labels(labels, ignore_index, weight.shape[0] // sub_centers)
        rows, lse, target_cos, top1 = reference_loss(embeddings, weight, labels, *margins, **flags)
        rows = rows.to(op.stats_dtype(embeddings.dtype))
    else:
        with torch.autocast(device.type, enabled=False):
            rows, lse, target_cos, top1 = op.margin_softmax_fwd(
                embeddings.contiguous(), weight.contiguous(), labels.contiguous(), *margins,
                *flags.values(), name)
    loss = _reduce(rows, labels != ignore_index, reduction)
    if return_stats:
        return loss, MarginLossStats(lse, target_cos, top1)
    return loss


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
