"""The `torch` backend's forward with gradients on a CPU: three GEMMs per problem instead of four.

The class walk of chunked.py recomputes each cosine tile in backward (4 GEMMs of 2NCD flops:
docs/design.md section 5). Where a block of rows' whole (rows x C) tile fits the workspace budget,
the tile computed for the loss is still there once the block's log-sum-exp is known, and the
gradients can be formed from it at once, for a unit upstream gradient on every row with a target
(g_i = 1; 0 on rows without one). dX_i is linear in g_i, and dW is g times this one when the
upstream gradient is the same g on every row with a target, which is what a "mean" or "sum"
reduction sends; op.forward_with_gradients / op._backward use it only then
(docs/backends/torch.md, "Gradients in forward"). Per block b of rows:

    phase 1, per class chunk c:  Z_c = xs_b W_c^T, scaled to s cos by forward_tile (col_scale rw_c),
                                 folded into the block's running row statistics
    finish_rows:                 the block's statistics, loss, lse, gap and target-gradient factor
                                 (the op's, op.finish_rows)
    phase 2, per class chunk c:  Z_c -> P_c diag(rw_c) in place (backward_tile, holds_logits)
                                 B_b += P_c diag(rw_c) W_c,  A_c += (P_c diag(rw_c))^T Xa_b

with xs = (s rx) X and Xa = xs on rows with a target (0 elsewhere): G = diag(a) P diag(rw) with
a = s rx g (eqs. (20)-(22)). After the last block, dW = A projected in place (eq. (24), the raw_w
form of project_chunk) and dX = a B projected (eq. (23)). The chunk tiles of a block are laid out
one after another in one buffer, so each is a contiguous GEMM output; a chunk's tile is at most
common.CPU_TILE_BYTES (phase 1's epilogue reads it while it is in cache). Phase 2 reads the block's
tile once more from memory: (rows x C) bytes twice per block, against the recompute GEMM's 2
rows C D flops saved.

Taken on a CPU with the fused epilogue, float32 / float64 class rows in the compute dtype, no
sub-centres and no non-target epilogue; otherwise (and where fewer than MIN_BLOCK_ROWS rows fit
the budget: each block reads and writes the C x D accumulator once) `forward_with_gradients`
returns None and the op runs the class walk.
"""

import torch

from ..dtypes import compute_dtype
from . import chunked
from .common import classes_per_chunk, get_workspace_budget, projection_factor, projection_scale, tile_classes
from .contract import PartialStats

# Rows per block, at least (or all N when fewer): below it the C x D accumulator's read and write
# per block (8 C D bytes) is no longer small against the block's 6 rows C D GEMM flops.
MIN_BLOCK_ROWS = 64
# Classes per chunk of a block, at most: narrow chunks keep the GEMMs fast with few rows (2 cores,
# float32, (164 x 128) x (128 x c): 51 GFLOP/s at c = 25,575, 60-74 at 4,096; fwd+bwd at
# (256, 100k, 512) 1.12 s with 4,096 against 1.23 s with 8,192, docs/backends/torch.md).
CHUNK_CLASSES = 4096


def block_rows(n_rows: int, n_classes: int, dim: int, dtype: torch.dtype) -> int:
    """Rows per block so that the block's (rows x C) tile and its B rows fit the workspace budget
    after the N x D operands (xs, Xa); 0 when fewer than min(N, MIN_BLOCK_ROWS) rows fit."""
    itemsize = torch.finfo(dtype).bits // 8
    per_row = (n_classes + dim) * itemsize
    rows = min(n_rows, classes_per_chunk(per_row, reserved=2 * n_rows * dim * itemsize))
    fits = rows * per_row + 2 * n_rows * dim * itemsize <= get_workspace_budget()
    return rows if fits and rows >= min(n_rows, MIN_BLOCK_ROWS) else 0


def eligible_rows(x, w, options) -> int:
    """Rows per block where forward_with_gradients takes these operands (the module docstring's
    conditions), else 0."""
    cdt = compute_dtype(x.dtype)
    takes = (chunked.fused_epilogue(x.device) and options.sub_centers == 1 and options.negatives is None
             and w.dtype == cdt and w.is_contiguous() and x.shape[0] > 0 and w.shape[0] > 0)
    return block_rows(x.shape[0], w.shape[0], x.shape[1], cdt) if takes else 0


def forward_with_gradients(x, w, labels, options, norms, finish_rows, need_dx: bool, need_dw: bool):
    """(stats, loss, lse, gap, dx, dw) for operands x, w (the rows the op's norm pass saw), or None
    where not eligible. finish_rows(running, labels, rows) -> (stats, loss, lse, gap, factor) is the
    op's row finish (op.finish_rows: the margin, finalize and the target-gradient factor per unit
    gradient) on the rows `rows` (a slice) from the walk's running statistics (chunked.finish_forward's
    inputs) and their labels. dx (N x D), dw (C x D, w's dtype) are the gradients of sum_i loss_i over rows with a
    target, in the compute dtype; None where not asked for."""
    rows_per_block = eligible_rows(x, w, options)
    if not rows_per_block:
        return None
    cdt, (n, dim), n_classes, s = compute_dtype(x.dtype), x.shape, w.shape[0], options.scale
    itemsize = torch.finfo(cdt).bits // 8
    ops, rw = chunked._CPU_OPS, norms.rw
    active = labels >= 0
    xs = torch.mul(x, (norms.rx * s).to(cdt)[:, None])
    xa = torch.where(active[:, None], xs, 0.0) if need_dw else None
    width = max(1, min(n_classes, CHUNK_CLASSES, tile_classes(rows_per_block * itemsize, x.device)))
    tile_buffer = torch.empty(rows_per_block * n_classes, dtype=cdt)
    dx = torch.empty(n, dim, dtype=cdt) if need_dx else None
    dw = torch.empty(n_classes, dim, dtype=cdt) if need_dw else None
    smoothing = options.label_smoothing != 0
    chunks = [(start, min(start + width, n_classes)) for start in range(0, n_classes, width)]
    blocks = []
    for first in range(0, n, rows_per_block):
        rows = slice(first, min(first + rows_per_block, n))
        count, block_labels = rows.stop - rows.start, labels[rows].contiguous()

        def tile(start, stop, count=count):
            return tile_buffer[count * start : count * stop].view(count, stop - start)

        running = _block_statistics(ops, xs[rows], w, rw, block_labels, chunks, tile, smoothing)
        stats, loss, lse, gap, factor = finish_rows(running, block_labels, rows)
        blocks.append((stats, loss, lse, gap))
        target_p = factor.to(cdt) / s  # P_iy - [j = y] for g = 1 (chunked.backward's target_p)
        lse_c = lse.to(cdt).contiguous()
        b = torch.zeros(count, dim, dtype=cdt) if need_dx else None
        for start, stop in chunks:  # phase 2: P diag(rw) from the kept tiles, the two gradient GEMMs
            p = tile(start, stop)
            ops.backward_tile(p, block_labels, start, target_p, options.label_smoothing / n_classes, rw[start:stop],
                              lse_c, holds_logits=True)
            if need_dx:
                b.addmm_(p, w[start:stop])
            if need_dw:
                if rows.start == 0:
                    torch.mm(p.T, xa[rows], out=dw[start:stop])
                else:
                    dw[start:stop].addmm_(p.T, xa[rows])
        if need_dx:  # eq. (23) with a = s rx on rows with a target
            b.mul_(torch.where(active[rows], norms.rx[rows] * s, 0.0).to(cdt)[:, None])
            chunked.tangent_project(b, x[rows], projection_scale(norms.rx[rows]), dx[rows])
    if need_dw:  # eq. (24) on the summed A, in place (project_chunk's raw_w form)
        projected = (projection_factor(rw) > 0).to(cdt)
        ops.project_chunk(dw, w, rw, projected, dw, True)
    stats, loss, lse, gap = (_cat(parts) for parts in zip(*blocks))
    return stats, loss, lse, gap, dx, dw


def _block_statistics(ops, xs_block, w, rw, labels, chunks, tile, smoothing):
    """Phase 1 of a block: each chunk's tile Z_c = s cos (kept in `tile(start, stop)`) folded into
    the block's running (non-target max, sum, best logit, its class, target logit, logit sum or
    None without smoothing), chunked.finish_forward's arguments."""
    count, cdt = xs_block.shape[0], xs_block.dtype
    nt_max = torch.full((count,), -float("inf"), dtype=cdt)
    nt_sum, target_z, logit_sum = (torch.zeros(count, dtype=cdt) for _ in range(3))
    best_z, best_class = nt_max.clone(), torch.zeros(count, dtype=torch.int64)
    for start, stop in chunks:
        z = torch.mm(xs_block, w[start:stop].T, out=tile(start, stop))
        ops.forward_tile(z, labels, start, nt_max, nt_sum, best_z, best_class, target_z, logit_sum, smoothing,
                         rw[start:stop])
    return nt_max, nt_sum, best_z, best_class, target_z, logit_sum if smoothing else None


def _cat(parts):
    if len(parts) == 1:  # one block (every small problem): its own tensors
        return parts[0]
    if isinstance(parts[0], PartialStats):
        return PartialStats(*(None if field[0] is None else torch.cat(field) for field in zip(*parts)))
    return torch.cat(parts)
