"""The `torch` backend's forward with gradients on a CPU: three GEMMs per problem instead of four.

The class walk of chunked.py recomputes each cosine tile in backward (4 GEMMs of 2NCD flops:
docs/design.md section 5). Where a block of rows' whole (rows x C) tile fits the workspace budget,
the tile computed for the loss is still there once the block's log-sum-exp is known, and the
gradients can be formed from it at once, for a unit upstream gradient on every row with a target
(g_i = 1; 0 on rows without one). dX_i is linear in g_i, and dW is g times this one when the
upstream gradient is the same g on every row with a target, which is what a "mean" or "sum"
reduction sends; op.forward_with_gradients / op._backward use it only then
(docs/backends/torch.md, "Gradients in forward"). Per block b of rows:

    phase 1, per class chunk c:  Z_c = xs_b W_c^T, scaled to s cos by the row kernel (col_scale rw_c),
                                 folded into the block's running row statistics
    row finish:                  the block's statistics, loss, lse, gap and target-gradient factor
    phase 2, per class chunk c:  Z_c -> P_c diag(rw_c) in place (holds_logits)
                                 B_b += P_c diag(rw_c) W_c,  A_c += (P_c diag(rw_c))^T Xa_b
    dX_b = a B_b projected (eq. (23))

with xs = (s rx) X and Xa = xs on rows with a target (0 elsewhere): G = diag(a) P diag(rw) with
a = s rx g (eqs. (20)-(22)). After the last block, dW = A projected in place (eq. (24), the raw_w
form of project_chunk). The chunk tiles of a block are laid out one after another in one buffer,
so each is a contiguous GEMM output; a chunk's tile is at most common.CPU_TILE_BYTES (phase 1's
epilogue reads it while it is in cache). Phase 2 reads the block's tile once more from memory:
(rows x C) bytes twice per block, against the recompute GEMM's 2 rows C D flops saved.

The whole walk is one op of the CPU extension, arcface_kernels_cpu.row_block_walk
(csrc/cpu_row_blocks.cpp: the fused epilogue's row kernels, ATen's GEMMs), so that a small head
pays one dispatch for it instead of about forty torch ops per block and chunk. Taken on a CPU with
that extension, float32 operands, no sub-centres and no non-target epilogue; otherwise (float64
included, and where fewer than MIN_BLOCK_ROWS rows fit the budget: each block reads and writes
the C x D accumulator once) `forward_with_gradients` returns None and the op runs the class walk.
"""

import torch

from . import chunked
from .common import classes_per_chunk, get_workspace_budget, projection_factor, tile_classes
from .contract import PartialStats

# Rows per block, at least (or all N when fewer): below it the C x D accumulator's read and write
# per block (8 C D bytes) is no longer small against the block's 6 rows C D GEMM flops.
MIN_BLOCK_ROWS = 64
# Classes per chunk of a block, at most: narrow chunks keep the GEMMs fast with few rows (2 cores,
# float32, (164 x 128) x (128 x c): 51 GFLOP/s at c = 25,575, 60-74 at 4,096; fwd+bwd at
# (256, 100k, 512) 1.12 s with 4,096 against 1.23 s with 8,192, docs/backends/torch.md).
CHUNK_CLASSES = 4096


def block_rows(n_rows: int, n_classes: int, dim: int) -> int:
    """Rows per block so that the block's float32 (rows x C) tile and its B rows fit the workspace
    budget after the N x D operands (xs, Xa); 0 when fewer than min(N, MIN_BLOCK_ROWS) rows fit.
    The blocks as even as the fewest of them allow: a last block of few rows runs its GEMMs
    about as long as a full one (at (1024, 100k, 128): 6 blocks of 164 rows and one of 40, which
    took as long as one of 164; docs/backends/torch.md "Gradients in forward")."""
    per_row = (n_classes + dim) * 4
    rows = min(n_rows, classes_per_chunk(per_row, reserved=2 * n_rows * dim * 4))
    fits = rows * per_row + 2 * n_rows * dim * 4 <= get_workspace_budget()
    if not fits or rows < min(n_rows, MIN_BLOCK_ROWS):
        return 0
    blocks = -(-n_rows // rows)
    return -(-n_rows // blocks)


def eligible_rows(x, w, options) -> int:
    """Rows per block where forward_with_gradients takes these operands (the module docstring's
    conditions), else 0."""
    takes = (chunked.fused_epilogue(x.device) and options.sub_centers == 1 and options.negatives is None
             and x.dtype == w.dtype == torch.float32 and x.is_contiguous() and w.is_contiguous()
             and x.shape[0] > 0 and w.shape[0] > 0)
    return block_rows(x.shape[0], w.shape[0], x.shape[1]) if takes else 0


def forward_with_gradients(x, w, labels, active, options, norms, num_classes: int, need_dx: bool, need_dw: bool):
    """(stats, loss, lse, gap, dx, dw) for operands x, w (the rows the op's norm pass saw), or None
    where not eligible: the CPU extension's row_block_walk (csrc/cpu_row_blocks.cpp). labels: local
    targets (-1 without one); active: the rows with a target in the whole problem; options: margins
    as (N,) tensors (LossOptions.for_rows). dx (N x D), dw (C x D) are the gradients of sum_i loss_i
    over rows with a target, float32; None where not asked for. The rule that decides which rows
    are projected (common.projection_factor) is applied here, once."""
    rows_per_block = eligible_rows(x, w, options)
    if not rows_per_block:
        return None
    width = max(1, min(w.shape[0], CHUNK_CLASSES, tile_classes(rows_per_block * 4, x.device)))
    # the rows clamped at eps are not projected: one projection_factor for both (the op squares the rows')
    factors = projection_factor(torch.cat((norms.rx, norms.rw)))
    *stats, loss, lse, gap, dx, dw = chunked._CPU_OPS.row_block_walk(
        x, w, labels, active, norms.rx, norms.rw, factors, options.m1, options.m2, options.m3, options.scale,
        options.easy_margin, options.clip, options.straight_through, options.label_smoothing, num_classes,
        rows_per_block, width, need_dx, need_dw)
    return PartialStats(*stats), loss, lse, gap, dx if need_dx else None, dw if need_dw else None
