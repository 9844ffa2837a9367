"""The fused op as torch.library custom ops, with registered autograd.

`arcface_kernels::margin_softmax_fwd` returns per-row loss and stats;
`arcface_kernels::margin_softmax_bwd` returns (dX, dW). Both dispatch by name to a
fused backend from the registry. Only O(N) numbers (the log-sum-exp) are saved for
backward, which recomputes the cosines (DESIGN.md section 3).
"""

import torch
from torch import Tensor

from .margins import saturating_cast
from .registry import MarginConfig, PartialStats, get_backend


def finalize(stats: PartialStats, active: Tensor, label_smoothing: float, num_classes: int):
    """Per-row loss and lse from merged partial statistics (F.cross_entropy's smoothing)."""
    lse = stats.row_max + torch.log(stats.sum_exp)
    loss = lse - (1.0 - label_smoothing) * stats.target_logit
    if label_smoothing:
        loss = loss - (label_smoothing / num_classes) * stats.logit_sum
    return torch.where(active, loss, 0.0), lse


def target_labels(labels: Tensor, ignore_index: int, num_classes: int) -> Tensor:
    """Labels as backends take them: -1 on ignored rows. ValueError on any label out of range."""
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; got {first}"
        )
    return torch.where(ignored, -1, labels)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses and statistics are float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(scale, sub_centers, easy_margin, straight_through, label_smoothing, num_classes):
    return MarginConfig(float(scale), int(sub_centers), bool(easy_margin), bool(straight_through),
                        float(label_smoothing), int(num_classes))


@torch.library.custom_op("arcface_kernels::margin_softmax_fwd", mutates_args=())
def margin_softmax_fwd(
    embeddings: Tensor, weight: Tensor, labels: Tensor, m1: Tensor, m2: Tensor, m3: Tensor,
    scale: float, sub_centers: int, easy_margin: bool, straight_through: bool,
    label_smoothing: float, ignore_index: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns loss_rows (0 on ignored rows), lse, target_cos (stats_dtype) and int64 top-1 class."""
    num_classes = weight.shape[0] // sub_centers
    labels = target_labels(labels, ignore_index, num_classes)
    cfg = _config(scale, sub_centers, easy_margin, straight_through, label_smoothing, num_classes)
    stats = get_backend(backend).forward(embeddings, weight, labels, m1, m2, m3, cfg)
    loss, lse = finalize(stats, labels >= 0, label_smoothing, num_classes)
    return loss, lse, stats.target_cos.clone(), stats.best_class.clone()


@margin_softmax_fwd.register_fake
def _(embeddings, weight, labels, m1, m2, m3, scale, sub_centers, easy_margin, straight_through,
      label_smoothing, ignore_index, backend):
    n = embeddings.shape[0]
    row = embeddings.new_empty((n,), dtype=stats_dtype(embeddings.dtype))
    return row, row.clone(), row.clone(), embeddings.new_empty((n,), dtype=torch.int64)


@torch.library.custom_op("arcface_kernels::margin_softmax_bwd", mutates_args=())
def margin_softmax_bwd(
    grad_rows: Tensor, embeddings: Tensor, weight: Tensor, labels: Tensor,
    m1: Tensor, m2: Tensor, m3: Tensor, lse: Tensor,
    scale: float, sub_centers: int, easy_margin: bool, straight_through: bool,
    label_smoothing: float, ignore_index: int, backend: str,
) -> tuple[Tensor, Tensor]:
    num_classes = weight.shape[0] // sub_centers
    labels = torch.where(labels == ignore_index, -1, labels)
    cfg = _config(scale, sub_centers, easy_margin, straight_through, label_smoothing, num_classes)
    grad_rows = torch.where(labels >= 0, grad_rows.to(stats_dtype(embeddings.dtype)), 0.0)
    dx, dw = get_backend(backend).backward(grad_rows, embeddings, weight, labels, m1, m2, m3, lse, cfg)
    return saturating_cast(dx, embeddings.dtype), saturating_cast(dw, weight.dtype)


@margin_softmax_bwd.register_fake
def _(grad_rows, embeddings, weight, labels, m1, m2, m3, lse, scale, sub_centers, easy_margin,
      straight_through, label_smoothing, ignore_index, backend):
    return torch.empty_like(embeddings), torch.empty_like(weight)


_SCALARS = ("scale", "sub_centers", "easy_margin", "straight_through", "label_smoothing",
            "ignore_index", "backend")


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels, m1, m2, m3, *scalars = inputs
    ctx.scalars = scalars
    ctx.save_for_backward(embeddings, weight, labels, m1, m2, m3, output[1])


def _backward(ctx, grad_loss, grad_lse, grad_target_cos, grad_top1):
    embeddings, weight, labels, m1, m2, m3, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dx, dw = margin_softmax_bwd(grad_loss, embeddings, weight, labels, m1, m2, m3, lse, *ctx.scalars)
    return (dx, dw) + (None,) * (4 + len(_SCALARS))


# The stats outputs (lse, target cosine, top-1) are reported, not differentiated.
torch.library.register_autograd("arcface_kernels::margin_softmax_fwd", _backward, setup_context=_setup_context)
