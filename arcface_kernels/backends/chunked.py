"""The `torch` backend: the fused op in plain PyTorch, walking the classes in chunks.

Runs on any device and dtype. Each chunk holds a few (N x chunk) tiles in the compute dtype,
sized so that they fit in the workspace budget (common.workspace_budget): no N x C tensor
ever exists. Math: docs/design.md sections 3-4 (online log-sum-exp forward, recompute in
backward).
"""

import torch

from ..dtypes import FLOAT_DTYPES, compute_dtype
from ..margins import phi
from .common import classes_per_chunk, projection_scale
from .contract import Backend, PartialStats
from .registry import register_backend


def chunk_classes(n_rows, sub_centers, dim, dtype):
    """Classes per chunk so that everything a chunk allocates fits in the workspace budget:
    at most three live (N x chunk * K) tiles (backward: cosines, dcos, dcos * cos), with
    sub-centers also the per-class max and its int64 index, and four (chunk * K x D) blocks (the
    class rows in the compute dtype, their gradient, its correction and its cast)."""
    itemsize = torch.finfo(dtype).bits // 8
    k, n = sub_centers, max(n_rows, 1)
    tiles = 3 * n * k * itemsize + (n * (itemsize + 8) if k > 1 else 0)
    return classes_per_chunk(tiles + 4 * k * dim * itemsize)


class ChunkCosines:
    """Cosines of all rows against one class chunk, max over sub-centers."""

    def __init__(self, x, rx, w, rw, start, stop, sub_centers):
        k = sub_centers
        self.w_rows = w[start * k : stop * k].to(x.dtype)
        self.rw_rows = rw[start * k : stop * k]
        raw = x @ self.w_rows.T
        self.raw = raw.mul_(rx[:, None]).mul_(self.rw_rows[None, :])
        if k == 1:
            self.cos, self.pick = raw, None
        else:
            self.cos, self.pick = raw.view(raw.shape[0], stop - start, k).max(dim=2)


def _target_in_chunk(labels, start, stop):
    inside = (labels >= start) & (labels < stop)
    return inside, torch.where(inside, labels - start, 0)


def forward(x, w, labels, options, norms):
    cdt = compute_dtype(x.dtype)
    n, dim = x.shape
    n_classes = w.shape[0] // options.sub_centers
    m1, m2, m3 = options.m1, options.m2, options.m3
    xc = x.to(cdt)
    rx, rw = norms
    s = options.scale

    def stat(value):
        return torch.full((n,), value, dtype=cdt, device=x.device)

    row_max, sum_exp, nontarget_sum_exp, logit_sum = stat(-float("inf")), stat(0.0), stat(0.0), stat(0.0)
    target_logit, target_cos, best_cos = stat(0.0), stat(0.0), stat(-float("inf"))
    best_class = torch.zeros(n, dtype=torch.int64, device=x.device)
    rows = torch.arange(n, device=x.device)
    step = chunk_classes(n, options.sub_centers, dim, cdt)
    for start in range(0, n_classes, step):
        stop = min(start + step, n_classes)
        tile = ChunkCosines(xc, rx, w, rw, start, stop, options.sub_centers)
        cos = tile.cos
        inside, local = _target_in_chunk(labels, start, stop)
        cos_y = cos[rows, local]
        margined = s * phi(cos_y, m1, m2, m3, options.easy_margin)
        z = cos * s
        z[rows, local] = torch.where(inside, margined, z[rows, local])
        target_logit = torch.where(inside, margined, target_logit)
        target_cos = torch.where(inside, cos_y, target_cos)
        logit_sum = logit_sum + z.sum(1)
        # online (max, sum-exp) merge; the target's term is kept apart so that the loss of a
        # well-classified row is not the difference of two nearly equal numbers (op.finalize)
        new_max = torch.maximum(row_max, z.max(dim=1).values)
        rescale = torch.exp(row_max - new_max)
        p = z.sub_(new_max[:, None]).exp_()
        p_target = torch.where(inside, p[rows, local], 0.0)
        p[rows, local] = torch.where(inside, 0.0, p[rows, local])
        chunk_nontarget = p.sum(1)
        nontarget_sum_exp = nontarget_sum_exp * rescale + chunk_nontarget
        sum_exp = sum_exp * rescale + (chunk_nontarget + p_target)
        row_max = new_max
        chunk_best, chunk_arg = cos.max(dim=1)  # the first maximum: the lowest class on ties
        better = chunk_best > best_cos  # strict: earlier chunks win ties
        best_class = torch.where(better, chunk_arg + start, best_class)
        best_cos = torch.where(better, chunk_best, best_cos)
        del tile, cos, z, p  # free this chunk's tiles before the next chunk allocates its own
    return PartialStats(row_max, sum_exp, target_logit, logit_sum, target_cos, best_cos, best_class,
                        nontarget_sum_exp)


def backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype):
    cdt = compute_dtype(x.dtype)
    n, dim = x.shape
    k = options.sub_centers
    n_classes = w.shape[0] // k
    xc = x.to(cdt)
    rx, rw = norms
    rx2, rw2 = projection_scale(rx), projection_scale(rw)
    g = grad_rows.to(cdt)
    lse = lse.to(cdt)
    s = options.scale
    smooth = options.label_smoothing / num_classes
    rows = torch.arange(n, device=x.device)
    dx = torch.zeros(n, dim, dtype=cdt, device=x.device)
    dw = torch.empty(w.shape, dtype=dw_dtype, device=w.device)
    step = chunk_classes(n, k, dim, cdt)
    # Tiles are updated in place: at most three live at once (chunk_classes).
    for start in range(0, n_classes, step):
        stop = min(start + step, n_classes)
        tile = ChunkCosines(xc, rx, w, rw, start, stop, k)
        inside, local = _target_in_chunk(labels, start, stop)
        # dcos = s g (p - eps / C) off the target, the op's target_dcos on it (docs/design.md eqs. (15)-(17))
        dcos = (tile.cos * s).sub_(lse[:, None]).exp_().sub_(smooth).mul_((s * g)[:, None])
        dcos[rows, local] = torch.where(inside, target_dcos.to(cdt), dcos[rows, local])
        if k > 1:  # route each class's gradient to its winning sub-center
            routed = torch.zeros_like(tile.raw).view(n, stop - start, k)
            dcos = routed.scatter_(2, tile.pick[:, :, None], dcos[:, :, None])
            dcos = dcos.view(n, (stop - start) * k)
            tile.cos = tile.pick = None
        dcos_cos = dcos * tile.raw
        row_terms, col_terms = dcos_cos.sum(1), dcos_cos.sum(0)
        del dcos_cos
        grad_tile = dcos.mul_(rx[:, None]).mul_(tile.rw_rows[None, :])
        w_rows = tile.w_rows.to(cdt)
        dx.addmm_(grad_tile, w_rows)
        dx.addcmul_(xc, (rx2 * row_terms)[:, None], value=-1.0)
        dw_rows = (grad_tile.T @ xc).addcmul_(w_rows, (rw2[start * k : stop * k] * col_terms)[:, None], value=-1.0)
        dw[start * k : stop * k] = dw_rows  # rounded to nearest: inf where it overflows dw_dtype
        del tile, dcos, grad_tile, w_rows, dw_rows  # free this chunk's tiles before the next chunk's
    return dx, dw


register_backend(
    Backend(
        name="torch",
        forward=forward,
        backward=backward,
        available=lambda device: (True, ""),
        dtypes=FLOAT_DTYPES,
        priority=lambda device, dtype: 10,
    )
)
