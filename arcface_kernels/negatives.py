"""The non-target epilogue: hard negatives remapped (docs/design.md section 3c, eqs. (N1)-(N4)).

CurricularFace, MV-Softmax and insightface's inter-class filtering change the non-target logits of
a row where its cosine is "hard": above a per-row threshold tau_i. Each is one quadratic map

    h(c) = a c^2 + b c + e    where c_ij > tau_i and j != y_i,   c_ij elsewhere     (N1)
    dh/dc = 2 a c + b         on the same entries,               1 elsewhere        (N2)

with (a, b, e) = (1, t, 0) for CurricularFace (c (t + c), t its running mean of target cosines),
(0, t, t - 1) for MV-Softmax (t c + t - 1, t = mv_weight) and (0, 0, 0) for the filtering (hard
entries set to 0, no gradient through them). The mask carries no gradient. tau_i is the row's
nominal margined target cosine cos(m1 theta_y + m2) - m3 (eq. (N3): no fallback rule, as the
authors' cos_theta_m) for CurricularFace and MV-Softmax, and the fixed threshold t for the
filtering. Every backend reads the same tau (N,) and (a, b, e) (3,) tensors, computed here once
per call from the target cosines (target_cosines, an O(N K D) gather-dot before the class loop).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from .backends.common import get_workspace_budget, overflow_safe_rows
from .dtypes import compute_dtype

NONTARGET_MODES = ("none", "curricular", "mv", "filter")


class HardNegatives(NamedTuple):
    """What a backend needs for eqs. (N1)-(N2), in the compute dtype."""

    threshold: Tensor  # (N,) tau_i; +inf on rows without a target (no entry is hard)
    coeffs: Tensor     # (3,) (a, b, e)


def kernel_tensors(negatives: HardNegatives | None) -> tuple:
    """(threshold, coeffs) as the compiled kernels take them, (None, None) on the plain path (to
    Triton's JIT None pointers are constants: its plain variants take no extra argument)."""
    return (None, None) if negatives is None else (negatives.threshold, negatives.coeffs)


def map_cosines(cos: Tensor, hard: Tensor, coeffs: Tensor) -> Tensor:
    """Eq. (N1) on the entries `hard` (a bool mask that already excludes targets): c (a c + b) + e."""
    a, b, e = coeffs.unbind(0)
    return torch.where(hard, cos * (a * cos + b) + e, cos)


def map_slope(cos: Tensor, hard: Tensor, coeffs: Tensor) -> Tensor:
    """Eq. (N2): d h / d c on the entries `hard`, 1 elsewhere."""
    a, b, _ = coeffs.unbind(0)
    return torch.where(hard, 2.0 * a * cos + b, torch.ones_like(cos))


def is_hard(cos: Tensor, threshold: Tensor, is_target: Tensor) -> Tensor:
    """The hard non-target entries of an (N, chunk) block of cosines (the mask of eq. (N1))."""
    return (cos > threshold[:, None]) & ~is_target


def nominal_target(target_cos: Tensor, m1: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    """Eq. (N3): cos(m1 acos(c) + m2) - m3 with no fallback rule past pi (CurricularFace's and
    MV-Softmax's cos_theta_m; for m1 = 1, m2 = 0 it is c - m3, MV-Softmax's AM threshold)."""
    return torch.cos(m1 * torch.acos(target_cos.clamp(-1.0, 1.0)) + m2) - m3


def coefficients(mode: str, t: Tensor) -> Tensor:
    """(a, b, e) of eq. (N1) for `mode`, from the map's parameter t (a 0-d tensor on the device: a
    running CurricularFace t is never read back to the host)."""
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    if mode == "curricular":
        return torch.stack((one, t, zero))
    if mode == "mv":
        return torch.stack((zero, t, t - 1.0))
    return torch.stack((zero, zero, zero))  # filter: hard entries become 0


def target_cosines(x: Tensor, w: Tensor, labels: Tensor, rx: Tensor, rw: Tensor, sub_centers: int) -> Tensor:
    """cos of each row to its target class (the max over its sub-centre rows), 0 where label < 0:
    the dot of the rows the backend sees times their inverse norms, as the kernels form it
    (docs/design.md section 4), accumulated in float64 (O(N K D), once per call), in row slices
    whose float64 temporaries stay within the workspace budget."""
    n, k = x.shape[0], sub_centers
    safe = torch.where(labels >= 0, labels, 0)
    rows = safe[:, None] * k + torch.arange(k, device=x.device)  # (N, K) rows of w
    # three (slice, K, D) float64 temporaries: the gathered rows, the row copy, their product
    step = max(1, get_workspace_budget() // (3 * 8 * k * max(1, x.shape[1])))
    cos = torch.empty(n, dtype=torch.float64, device=x.device)
    for first in range(0, n, step):
        part = rows[first:first + step]
        dots = (x[first:first + step, None, :].double() * w[part].double()).sum(2)
        cos[first:first + step] = (dots * rx[first:first + step, None].double() * rw[part].double()).amax(1)
    return torch.where(labels >= 0, cos, 0.0).to(rx.dtype)


def hard_negatives(mode: str, t: Tensor, target_cos: Tensor, active: Tensor, m1: Tensor, m2: Tensor,
                   m3: Tensor) -> HardNegatives:
    """tau and (a, b, e) for `mode` (not "none"), given each row's target cosine (merged over class
    shards in the sharded loss) and the rows with a target in the whole problem."""
    if mode == "filter":
        threshold = t.expand(target_cos.shape)
    else:
        threshold = nominal_target(target_cos, m1, m2, m3)
    threshold = torch.where(active, threshold, torch.inf).to(target_cos.dtype).contiguous()
    return HardNegatives(threshold, coefficients(mode, t.to(target_cos.dtype)))


def head_target_cosines(x: Tensor, w: Tensor, targets: Tensor, sub_centers: int) -> Tensor:
    """target_cosines for a head's running statistics (CurricularFace's t) before the op runs:
    the same gather-dot on the rows the op sees (common.overflow_safe_rows, no host read on a
    GPU), but only the target rows of w are gathered and normed, O(N K D) with no pass over the
    other classes. x: the operands (the op's operand dtype); w: the class rows in any float dtype
    (only the gathered rows are cast to x's); targets: (N,) class indices, -1 where absent."""
    dtype, k, n = compute_dtype(x.dtype), sub_centers, x.shape[0]
    safe = torch.where(targets >= 0, targets, 0)
    rows = (safe[:, None] * k + torch.arange(k, device=x.device)).reshape(-1)
    x_seen, rx, _ = overflow_safe_rows(x, dtype, sync_free=True)
    w_seen, rw, _ = overflow_safe_rows(w[rows].to(x.dtype), dtype, sync_free=True)
    # row i's gathered centres are rows i*k .. i*k+k-1 of w_seen: label i
    local = torch.where(targets >= 0, torch.arange(n, device=x.device), -1)
    return target_cosines(x_seen, w_seen, local, rx, rw, k)
