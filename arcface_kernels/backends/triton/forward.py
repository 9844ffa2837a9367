"""Forward: per-split partial statistics of the margined logits, then a deterministic combine.

Program (row block, class split) walks its classes tile by tile with an online (max, sum-exp)
per row (docs/design.md section 4), and writes its partial PartialStats; splitting the classes lets a
small batch fill the GPU. The combine over splits is a handful of O(N * splits) torch ops in a
fixed order: no locks, no atomics.
"""

import torch
import triton
import triton.language as tl

from ..contract import PartialStats
from .tiles import class_cosines, load_row_terms, target_terms


@triton.jit
def partial_stats_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr,
    stats_ptr, best_class_ptr,
    N, C, D, stride_x, stride_w, classes_per_split, scale,
    K: tl.constexpr, EASY_MARGIN: tl.constexpr, SMOOTHING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rx, labels, m1, m2, m3 = load_row_terms(rows, row_mask, rx_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    nontarget_sum_exp = tl.zeros((BLOCK_M,), tl.float32)  # the target's term kept apart (op.finalize)
    logit_sum = tl.zeros((BLOCK_M,), tl.float32)  # left 0 without label smoothing (contract.PartialStats)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    target_cos = tl.zeros((BLOCK_M,), tl.float32)
    best_cos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_class = tl.zeros((BLOCK_M,), tl.int32)
    start = split * classes_per_split
    stop = tl.minimum(start + classes_per_split, C)
    for first in range(start, stop, BLOCK_N):
        classes = first + tl.arange(0, BLOCK_N)
        class_mask = classes < stop
        cos, _ = class_cosines(x_ptr, rows, row_mask, rx, stride_x, w_ptr, rw_ptr, classes, class_mask, stride_w, D,
                               K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        # classes past the split: -inf, out of every max and sum (scale > 0: z is -inf there too)
        cos = tl.where(class_mask[None, :], cos, float("-inf"))
        z = scale * cos
        # The margin only where some row's label falls inside this tile: a scalar branch, so the
        # other tiles (all but about N of the C / BLOCK_N per row block) skip the target terms.
        in_tile = (labels >= first) & (labels < first + BLOCK_N)
        holds_targets = tl.max(in_tile.to(tl.int32), axis=0) > 0
        if holds_targets:
            is_target, cos_y, logit_y = target_terms(cos, classes, labels, m1, m2, m3, scale, EASY_MARGIN)
            z = tl.where(is_target, logit_y[:, None], z)
            target_logit = tl.where(in_tile, logit_y, target_logit)
            target_cos = tl.where(in_tile, cos_y, target_cos)
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        rescale = tl.exp(row_max - new_max)
        e = tl.exp(z - new_max[:, None])
        tile_sum = tl.sum(e, axis=1)
        tile_nontarget = tile_sum
        if holds_targets:
            tile_nontarget = tl.sum(tl.where(classes[None, :] == labels[:, None], 0.0, e), axis=1)
        sum_exp = sum_exp * rescale + tile_sum
        nontarget_sum_exp = nontarget_sum_exp * rescale + tile_nontarget
        row_max = new_max
        if SMOOTHING:
            logit_sum += tl.sum(tl.where(class_mask[None, :], z, 0.0), axis=1)
        tile_best = tl.max(cos, axis=1)
        # the lowest index among the tile's maxima
        tile_arg = tl.min(tl.where(cos == tile_best[:, None], classes[None, :], C), axis=1)
        better = tile_best > best_cos  # strict: earlier tiles win ties
        best_class = tl.where(better, tile_arg, best_class)
        best_cos = tl.where(better, tile_best, best_cos)

    out = stats_ptr + split * N + rows
    plane = tl.num_programs(1) * N
    tl.store(out, row_max, mask=row_mask)
    tl.store(out + plane, sum_exp, mask=row_mask)
    tl.store(out + 2 * plane, target_logit, mask=row_mask)
    tl.store(out + 3 * plane, logit_sum, mask=row_mask)
    tl.store(out + 4 * plane, target_cos, mask=row_mask)
    tl.store(out + 5 * plane, best_cos, mask=row_mask)
    tl.store(out + 6 * plane, nontarget_sum_exp, mask=row_mask)
    tl.store(best_class_ptr + split * N + rows, best_class.to(tl.int64), mask=row_mask)


def combine_splits(stats, best_class):
    """PartialStats of all classes from per-split partials (7, S, N) and (S, N), in split order."""
    row_max, sum_exp, target_logit, logit_sum, target_cos, best_cos, nontarget_sum_exp = stats.unbind(0)
    merged_max = row_max.max(dim=0).values
    rescale = torch.exp(row_max - merged_max)
    # only the split holding the target wrote a nonzero target term
    winner = best_cos.argmax(dim=0, keepdim=True)  # first maximum: the lowest split, so the lowest class
    return PartialStats(
        merged_max, (sum_exp * rescale).sum(dim=0), target_logit.sum(0), logit_sum.sum(0), target_cos.sum(0),
        best_cos.gather(0, winner)[0], best_class.gather(0, winner)[0], (nontarget_sum_exp * rescale).sum(dim=0),
    )
