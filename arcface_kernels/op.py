"""The fused op as torch.library custom ops, with registered autograd.

`arcface_kernels::margin_softmax_fwd` returns per-row loss and stats;
`arcface_kernels::margin_softmax_bwd` returns (dX, dW). Both dispatch by name to a fused
backend from the registry. The LossOptions travel flattened (`LossOptions.flatten`): the
schemas take tensors and plain scalars only. Only O(N + C) numbers (the log-sum-exp and the
inverse norms, computed once per call) are saved for backward, which recomputes the cosines
(docs/design.md section 5).
"""

import torch
from torch import Tensor

from .backends import PartialStats, RowNorms, get_backend
from .backends.common import overflow_safe_rows
from .dtypes import compute_dtype, saturating_cast
from .options import LossOptions
from .validation import target_labels as _target_labels


@torch.library.custom_op("arcface_kernels::target_labels", mutates_args=())
def target_labels(labels: Tensor, ignore_index: int, num_classes: int) -> Tensor:
    """validation.target_labels as an op: its ValueError on a bad label also fires inside a
    torch.compile'd graph, where a Python check on tensor values would be traced away."""
    return _target_labels(labels, ignore_index, num_classes)


@target_labels.register_fake
def _(labels, ignore_index, num_classes):
    return labels.new_empty(labels.shape, dtype=torch.int64)


def finalize(stats: PartialStats, active: Tensor, label_smoothing: float, num_classes: int):
    """Per-row loss and lse from merged partial statistics (F.cross_entropy's smoothing).

    With the non-target sum, lse - z_y = log(1 + sum_{j != y} exp(z_j - z_y)) is computed as
    logaddexp(0, log(sum_{j != y} exp(z_j - m)) + m - z_y): a well-classified row's loss of 2e-7
    keeps its relative precision instead of being the difference of two numbers near lse.
    """
    lse = stats.row_max + torch.log(stats.sum_exp)
    if stats.nontarget_sum_exp is None:
        loss = lse - stats.target_logit
    else:
        margin = torch.log(stats.nontarget_sum_exp) + stats.row_max - stats.target_logit
        loss = torch.logaddexp(torch.zeros_like(margin), margin)
    if label_smoothing:
        loss = loss + label_smoothing * stats.target_logit - (label_smoothing / num_classes) * stats.logit_sum
    return torch.where(active, loss, 0.0), lse


def _scale_or_ones(scale, n, dtype, device):
    return torch.ones(n, dtype=dtype, device=device) if scale is None else scale


def _rows_seen(v: Tensor, scale: Tensor):
    """The rows a backend saw in forward (common.overflow_safe_rows), or None where it saw v."""
    if not bool((scale != 1).any()):
        return None
    return v * scale[:, None].to(v.dtype)


@torch.library.custom_op("arcface_kernels::margin_softmax_fwd", mutates_args=())
def margin_softmax_fwd(
    embeddings: Tensor, weight: Tensor, labels: Tensor, m1: Tensor, m2: Tensor, m3: Tensor,
    options: list[float], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns loss_rows (0 on ignored rows), lse, target_cos (compute dtype), int64 top-1 class,
    and for backward the inverse norms rx, rw of the rows the backend saw and the power-of-two
    scales sx, sw that made those rows from the given ones (1 for all but huge rows)."""
    opts = LossOptions.unflatten(options, m1, m2, m3)
    num_classes = weight.shape[0] // opts.sub_centers
    labels = _target_labels(labels, opts.ignore_index, num_classes)
    dtype = compute_dtype(embeddings.dtype)
    x_seen, rx, sx = overflow_safe_rows(embeddings, dtype)
    w_seen, rw, sw = overflow_safe_rows(weight, dtype)
    stats = get_backend(backend).forward(x_seen, w_seen, labels, opts, RowNorms(rx, rw))
    loss, lse = finalize(stats, labels >= 0, opts.label_smoothing, num_classes)
    return (loss, lse, stats.target_cos.clone(), stats.best_class.clone(), rx, rw,
            _scale_or_ones(sx, embeddings.shape[0], dtype, embeddings.device),
            _scale_or_ones(sw, weight.shape[0], dtype, weight.device))


@margin_softmax_fwd.register_fake
def _(embeddings, weight, labels, m1, m2, m3, options, backend):
    n, dtype = embeddings.shape[0], compute_dtype(embeddings.dtype)
    row = embeddings.new_empty((n,), dtype=dtype)
    class_row = weight.new_empty((weight.shape[0],), dtype=dtype)
    return (row, row.clone(), row.clone(), embeddings.new_empty((n,), dtype=torch.int64), row.clone(),
            class_row, row.clone(), class_row.clone())


@torch.library.custom_op("arcface_kernels::margin_softmax_bwd", mutates_args=())
def margin_softmax_bwd(
    grad_rows: Tensor, embeddings: Tensor, weight: Tensor, labels: Tensor, m1: Tensor, m2: Tensor, m3: Tensor,
    lse: Tensor, rx: Tensor, rw: Tensor, sx: Tensor, sw: Tensor, options: list[float], backend: str,
) -> tuple[Tensor, Tensor]:
    opts = LossOptions.unflatten(options, m1, m2, m3)
    num_classes = weight.shape[0] // opts.sub_centers
    labels = torch.where(labels == opts.ignore_index, -1, labels.long())
    grad_rows = torch.where(labels >= 0, grad_rows.to(compute_dtype(embeddings.dtype)), 0.0)
    x_seen, w_seen = _rows_seen(embeddings, sx), _rows_seen(weight, sw)
    dx, dw = get_backend(backend).backward(
        grad_rows, embeddings if x_seen is None else x_seen, weight if w_seen is None else w_seen, labels, lse, opts,
        num_classes, RowNorms(rx, rw))
    # d/dv of a function of the seen rows s * v is s times the gradient with respect to them.
    if x_seen is not None:
        dx = dx * sx[:, None]
    if w_seen is not None:
        dw = dw * sw[:, None].to(dw.dtype)
    return saturating_cast(dx, embeddings.dtype), saturating_cast(dw, weight.dtype)


@margin_softmax_bwd.register_fake
def _(grad_rows, embeddings, weight, labels, m1, m2, m3, lse, rx, rw, sx, sw, options, backend):
    return torch.empty_like(embeddings), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels, m1, m2, m3, options, backend = inputs
    ctx.settings = (options, backend)
    loss, lse, target_cos, top1, rx, rw, sx, sw = output
    # Reported, not differentiated: api.py makes a loss built on them raise (in eager mode).
    ctx.mark_non_differentiable(lse, target_cos, top1, rx, rw, sx, sw)
    ctx.save_for_backward(embeddings, weight, labels, m1, m2, m3, lse, rx, rw, sx, sw)


def _backward(ctx, grad_loss, *grad_reported):
    embeddings, weight, labels, m1, m2, m3, lse, rx, rw, sx, sw = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dx, dw = margin_softmax_bwd(grad_loss, embeddings, weight, labels, m1, m2, m3, lse, rx, rw, sx, sw,
                                *ctx.settings)
    return dx, dw, None, None, None, None, None, None


# Only the loss rows are differentiated; the stats, the norms and the scales are reported.
torch.library.register_autograd("arcface_kernels::margin_softmax_fwd", _backward, setup_context=_setup_context)


def fused_loss_rows(embeddings: Tensor, weight: Tensor, labels: Tensor, options: LossOptions, backend: str):
    """The op on validated inputs whose margins are (N,) tensors: (loss_rows, lse, target_cos, top1)."""
    outputs = margin_softmax_fwd(embeddings, weight, labels, options.m1, options.m2, options.m3,
                                 options.flatten(), backend)
    return outputs[:4]
