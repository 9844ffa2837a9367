"""The `torch` backend: the fused op in plain PyTorch, walking the classes in chunks.

Runs on any device. Each chunk holds a few (N x chunk) float32 tiles; the chunk is
sized so that they fit in the workspace budget, so no N x C tensor ever exists.
Math: DESIGN.md section 3 (online log-sum-exp forward, recompute in backward).
"""

import contextlib

import torch

from .margins import NORM_EPS, dphi_dcos, phi, saturating_cast
from .registry import Backend, PartialStats, register_backend

_DEFAULT_BUDGET = 64 * 2**20
_workspace_budget = _DEFAULT_BUDGET
# Live (N x chunk*K) float32 tiles in backward, the larger of the two passes.
_TILES_PER_CHUNK = 6


def get_workspace_budget() -> int:
    return _workspace_budget


@contextlib.contextmanager
def workspace_budget(nbytes: int):
    """Temporarily bound the torch backend's per-chunk workspace to `nbytes`."""
    global _workspace_budget
    if int(nbytes) <= 0:
        raise ValueError(f"workspace budget must be positive, got {nbytes}")
    previous, _workspace_budget = _workspace_budget, int(nbytes)
    try:
        yield
    finally:
        _workspace_budget = previous


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def classes_per_chunk(n_rows, sub_centers, dim):
    per_class = (_TILES_PER_CHUNK * max(n_rows, 1) + 2 * dim) * sub_centers * 4
    return max(1, _workspace_budget // per_class)


# Rows are upcast for their norms a slice at a time: a float32 copy of a bf16 weight with
# millions of rows would be larger than the whole workspace.
_NORM_SLICE_BYTES = 16 * 2**20


def inverse_norms(v, compute_dtype):
    """1 / max(|v_i|, eps) per row, and the mask of rows whose norm exceeds eps."""
    norms = torch.empty(v.shape[0], dtype=compute_dtype, device=v.device)
    step = max(1, _NORM_SLICE_BYTES // (max(v.shape[1], 1) * 8))
    for start in range(0, v.shape[0], step):
        norms[start : start + step] = torch.linalg.vector_norm(v[start : start + step].to(compute_dtype), dim=1)
    return 1.0 / norms.clamp_min(NORM_EPS), norms > NORM_EPS


class ChunkCosines:
    """Cosines of all rows against one class chunk, max over sub-centers."""

    def __init__(self, x, rx, w, rw, start, stop, sub_centers):
        k = sub_centers
        self.w_rows = w[start * k : stop * k].to(x.dtype)
        self.rw_rows = rw[start * k : stop * k]
        raw = (x @ self.w_rows.T) * rx[:, None] * self.rw_rows[None, :]
        self.raw = raw
        if k == 1:
            self.cos, self.pick = raw, None
        else:
            self.cos, self.pick = raw.view(raw.shape[0], -1, k).max(dim=2)


def _target_in_chunk(labels, start, stop):
    inside = (labels >= start) & (labels < stop)
    return inside, torch.where(inside, labels - start, 0)


def forward(x, w, labels, m1, m2, m3, cfg):
    cdt = _compute_dtype(x.dtype)
    n, dim = x.shape
    n_classes = w.shape[0] // cfg.sub_centers
    xc = x.to(cdt)
    rx, _ = inverse_norms(x, cdt)
    rw, _ = inverse_norms(w, cdt)
    s = cfg.scale

    def stat(value):
        return torch.full((n,), value, dtype=cdt, device=x.device)

    row_max, sum_exp, logit_sum = stat(-float("inf")), stat(0.0), stat(0.0)
    target_logit, target_cos, best_cos = stat(0.0), stat(0.0), stat(-float("inf"))
    best_class = torch.zeros(n, dtype=torch.int64, device=x.device)
    rows = torch.arange(n, device=x.device)
    step = classes_per_chunk(n, cfg.sub_centers, dim)
    for start in range(0, n_classes, step):
        stop = min(start + step, n_classes)
        tile = ChunkCosines(xc, rx, w, rw, start, stop, cfg.sub_centers)
        cos = tile.cos
        inside, local = _target_in_chunk(labels, start, stop)
        cos_y = cos[rows, local]
        margined = s * phi(cos_y, m1, m2, m3, cfg.easy_margin)
        z = s * cos
        z[rows, local] = torch.where(inside, margined, z[rows, local])
        target_logit = torch.where(inside, margined, target_logit)
        target_cos = torch.where(inside, cos_y, target_cos)
        # online (max, sum-exp) merge
        new_max = torch.maximum(row_max, z.max(dim=1).values)
        sum_exp = sum_exp * torch.exp(row_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
        row_max = new_max
        logit_sum = logit_sum + z.sum(1)
        chunk_best, chunk_arg = cos.max(dim=1)
        better = chunk_best > best_cos  # strict: earlier chunks win ties
        best_class = torch.where(better, chunk_arg + start, best_class)
        best_cos = torch.where(better, chunk_best, best_cos)
    return PartialStats(row_max, sum_exp, target_logit, logit_sum, target_cos, best_cos, best_class)


def backward(grad_rows, x, w, labels, m1, m2, m3, lse, cfg):
    cdt = _compute_dtype(x.dtype)
    n, dim = x.shape
    k = cfg.sub_centers
    n_classes = w.shape[0] // k
    xc = x.to(cdt)
    rx, x_active = inverse_norms(x, cdt)
    rw, w_active = inverse_norms(w, cdt)
    # The normalization term of dX/dW exists only where the norm is above eps (F.normalize).
    rx2 = torch.where(x_active, rx * rx, 0.0)
    rw2 = torch.where(w_active, rw * rw, 0.0)
    g = grad_rows.to(cdt)
    lse = lse.to(cdt)
    s, eps = cfg.scale, cfg.label_smoothing
    smooth = eps / cfg.num_classes
    rows = torch.arange(n, device=x.device)
    dx = torch.zeros(n, dim, dtype=cdt, device=x.device)
    dw = torch.empty_like(w)
    step = classes_per_chunk(n, k, dim)
    for start in range(0, n_classes, step):
        stop = min(start + step, n_classes)
        tile = ChunkCosines(xc, rx, w, rw, start, stop, k)
        cos = tile.cos
        inside, local = _target_in_chunk(labels, start, stop)
        cos_y = cos[rows, local]
        z = s * cos
        z_y = s * phi(cos_y, m1, m2, m3, cfg.easy_margin)
        # dz = g * (p - (1 - eps) [j = y] - eps / C); target via expm1 (DESIGN.md 3)
        dz = torch.exp(z - lse[:, None]) - smooth
        dz_y = torch.expm1(z_y - lse) + eps - smooth
        dz[rows, local] = torch.where(inside, dz_y, dz[rows, local])
        dcos = dz * (s * g[:, None])
        slope = dphi_dcos(cos_y, m1, m2, m3, cfg.easy_margin, cfg.straight_through)
        dcos[rows, local] = torch.where(inside, dcos[rows, local] * slope, dcos[rows, local])
        if k > 1:  # route each class's gradient to its winning sub-center
            dcos = torch.zeros_like(tile.raw).view(n, -1, k).scatter_(2, tile.pick[:, :, None], dcos[:, :, None]).view(n, -1)
        dcos_cos = dcos * tile.raw
        grad_tile = dcos * rx[:, None] * tile.rw_rows[None, :]
        w_rows = tile.w_rows.to(cdt)
        dx += grad_tile @ w_rows
        dx -= (rx2 * dcos_cos.sum(1))[:, None] * xc
        chunk_rw2 = rw2[start * k : stop * k]
        dw_rows = grad_tile.T @ xc - (chunk_rw2 * dcos_cos.sum(0))[:, None] * w_rows
        dw[start * k : stop * k] = saturating_cast(dw_rows, w.dtype)
    return dx, dw


register_backend(
    Backend(
        name="torch",
        forward=forward,
        backward=backward,
        available=lambda device: (True, ""),
        priority=lambda device: 0,
    )
)
