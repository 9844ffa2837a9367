"""What a backend computes (docs/design.md sections 3-4).

A backend sees raw embeddings x (N, D) and raw class rows w (C_local * K, D) in one of the
dtypes it declares, and

forward(x, w, labels, options, norms) -> PartialStats
    per-row *partial* statistics over the classes it is given: the op turns them into the
    loss (op.finalize); the distributed module merges the partials of several class shards
    with the same rule before finalizing.
backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype) -> (dx, dw)
    the gradients given the final log-sum-exp of every row and the target entries' dcos. dx is
    float32 (float64 for float64 inputs) and is this call's contribution only (shards sum
    theirs); dw covers exactly the rows of w, accumulated in the compute dtype and rounded once
    into dw_dtype (the master weight's dtype, which may be wider than w's): to nearest, inf on
    overflow, never clamped.

labels: int64 (N,), local class indices, -1 where the row has no target among these classes
(ignored, or owned by another shard): backends never see ignore_index. grad_rows: (N,) in the
compute dtype, 0 on ignored rows. options: a LossOptions whose m1, m2, m3 are (N,) tensors in
the compute dtype (LossOptions.for_rows). num_classes: C of the whole problem, over which label
smoothing spreads its mass. target_dcos: (N,) in the compute dtype, d loss / d cos of each
row's target class, computed once per row by the op (op.target_cosine_gradient times grad_rows,
docs/design.md eqs. (16)-(17)): a backend writes it at the target entry (routed to the target
class's winning sub-centre, eq. (18)) and computes only the non-target entries s g (p - eps/C);
it never evaluates phi or dphi/dc in backward. norms: RowNorms, the inverse norms of x's and
w's rows, computed once per call (common.row_norms) and saved by the op for backward: O(N + C)
numbers.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


class RowNorms(NamedTuple):
    """Inverse norms 1 / max(|v|, eps) of every row, in the compute dtype. A row whose norm is at
    most eps has rx = 1 / eps exactly: its normalization gradient term vanishes, as through
    F.normalize (common.projection_scale)."""

    rx: torch.Tensor  # (N,)
    rw: torch.Tensor  # (C * K,)


class PartialStats(NamedTuple):
    """Per-row statistics of z = s * cos (target margined) over a set of classes, in the
    compute dtype (dtypes.compute_dtype).

    row_max:      max_j z_ij
    sum_exp:      sum_j exp(z_ij - row_max)
    target_logit: s * phi(cos_iy) where label_i >= 0, else 0
    logit_sum:    sum_j z_ij, read only with label smoothing (a backend may leave it 0 when
                  options.label_smoothing == 0)
    target_cos:   cos_iy where label_i >= 0, else 0
    best_cos:     max_j cos_ij (plain cosine, no margin)
    best_class:   int64 argmax_j cos_ij, the lowest index on ties
    nontarget_sum_exp: sum_{j != y_i} exp(z_ij - row_max) (optional; None where a backend does
                  not compute it): op.finalize then gets the loss of a well-classified row
                  without cancellation
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    target_cos: torch.Tensor
    best_cos: torch.Tensor
    best_class: torch.Tensor
    nontarget_sum_exp: torch.Tensor | None = None


@dataclass(frozen=True)
class Backend:
    """A fused backend as the registry knows it."""

    name: str
    forward: Callable[..., PartialStats]
    backward: Callable[..., tuple]
    # available(device) -> (ok, reason when not ok)
    available: Callable[[torch.device], tuple]
    # the input dtypes it takes; "auto" skips it for others, an explicit request gets an error
    dtypes: tuple
    # priority(device, dtype): "auto" picks the highest among the backends that take the device
    # and dtype; below 0: never picked by "auto" on that device (tests only)
    priority: Callable[[torch.device, torch.dtype], int]
    # forward_with_gradients(x, w, labels, active, options, norms, num_classes, need_dx, need_dw) ->
    # (stats, loss, lse, gap, dx, dw) or None: the forward and, from the same tiles, the gradients
    # for a unit upstream gradient on every row with a target (op.forward_with_gradients); None
    # (the field, or the result for inputs it does not take): the op runs forward and backward.
    forward_with_gradients: Callable[..., tuple | None] | None = None
