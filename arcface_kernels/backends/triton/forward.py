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
from .math import phi
from .tiles import class_cosines, load_hard_negatives, load_row_terms, map_hard


@triton.jit
def partial_stats_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr, threshold_ptr, coeffs_ptr,
    stats_ptr, best_class_ptr,
    N, C, D, stride_x, stride_w, classes_per_split, scale,
    K: tl.constexpr, NONTARGET: tl.constexpr, EASY_MARGIN: tl.constexpr, CLIP_EPS: tl.constexpr,
    SMOOTHING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rx, labels, m1, m2, m3 = load_row_terms(rows, row_mask, rx_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr)
    if NONTARGET:  # the non-target epilogue's tau_i and (a, b, e) (None pointers on the plain path)
        # (named apart from the loop's e: the exps)
        threshold, map_a, map_b, map_e = load_hard_negatives(rows, row_mask, threshold_ptr, coeffs_ptr)

    # The loop walks the non-target classes only; each row's margined target logit s*phi(cos_y)
    # joins once after it, in the split that holds the label, as a part of its own merged by
    # docs/design.md eq. (14): no margin math runs per tile, the non-target sum S' needs no
    # second sum, and the epilogue is 1,043 SASS instructions per tile instead of 1,624.
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    nontarget_sum_exp = tl.zeros((BLOCK_M,), tl.float32)  # the target's term kept apart (op.finalize)
    logit_sum = tl.zeros((BLOCK_M,), tl.float32)  # left 0 without label smoothing (contract.PartialStats)
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
        if NONTARGET:  # hard non-targets remapped, eq. (N1), while the padding's cosine is 0, not -inf
            z = scale * tl.where(class_mask[None, :], map_hard(cos, threshold, map_a, map_b, map_e), float("-inf"))
            cos = tl.where(class_mask[None, :], cos, float("-inf"))
        else:
            cos = tl.where(class_mask[None, :], cos, float("-inf"))
            z = scale * cos
        # Targets only where some row's label falls inside this tile: a scalar branch, so the
        # other tiles (all but about N of the C / BLOCK_N per row block) skip it.
        in_tile = (labels >= first) & (labels < first + BLOCK_N)
        if tl.max(in_tile.to(tl.int32), axis=0) > 0:
            is_target = classes[None, :] == labels[:, None]
            target_cos = tl.where(in_tile, tl.sum(tl.where(is_target, cos, 0.0), axis=1), target_cos)
            z = tl.where(is_target, float("-inf"), z)
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        # a row with no non-target class so far (its split's first tile holds only its target)
        # shifts by 0: exp(-inf) = 0, where -inf - -inf would give NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        e = tl.exp(z - shift[:, None])
        nontarget_sum_exp = nontarget_sum_exp * tl.exp(row_max - shift) + tl.sum(e, axis=1)
        row_max = new_max
        if SMOOTHING:
            logit_sum += tl.sum(tl.where(z == float("-inf"), 0.0, z), axis=1)
        tile_best = tl.max(cos, axis=1)
        # the lowest index among the tile's maxima
        tile_arg = tl.min(tl.where(cos == tile_best[:, None], classes[None, :], C), axis=1)
        better = tile_best > best_cos  # strict: earlier tiles win ties
        best_class = tl.where(better, tile_arg, best_class)
        best_cos = tl.where(better, tile_best, best_cos)

    own_target = (labels >= start) & (labels < stop)
    target_logit = tl.where(own_target, scale * phi(target_cos, m1, m2, m3, EASY_MARGIN, CLIP_EPS), 0.0)
    if SMOOTHING:
        logit_sum += target_logit  # 0 where the split does not hold the label
    target_z = tl.where(own_target, target_logit, float("-inf"))
    # finite: the split holds a non-target class or the row's target
    merged_max = tl.maximum(row_max, target_z)
    nontarget_sum_exp *= tl.exp(row_max - merged_max)
    sum_exp = nontarget_sum_exp + tl.exp(target_z - merged_max)
    row_max = merged_max

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
