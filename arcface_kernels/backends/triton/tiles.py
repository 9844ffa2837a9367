"""Tile helpers shared by the forward and backward kernels.

Tiles are loaded raw (input dtype) and the inverse norms r = 1 / max(|v|, eps) scale the dot
product afterwards: cos = (X W^T) * (rx rw^T) (docs/design.md section 4). Scaling after the float32
accumulation keeps cosines near +-1 accurate, where dphi/dc amplifies errors.
"""

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, rows, row_mask, stride, first_col, D, BLOCK: tl.constexpr):
    """Columns [first_col, first_col + BLOCK) of rows `rows` of a (R, D) matrix, 0 past its ends."""
    cols = first_col + tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_row_terms(rows, row_mask, rx_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr):
    """A row block's inverse norms, labels (-1 on padding rows) and per-row margins."""
    rx = tl.load(rx_ptr + rows, mask=row_mask, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    m1 = tl.load(m1_ptr + rows, mask=row_mask, other=1.0)
    m2 = tl.load(m2_ptr + rows, mask=row_mask, other=0.0)
    m3 = tl.load(m3_ptr + rows, mask=row_mask, other=0.0)
    return rx, labels, m1, m2, m3


@triton.jit
def cosine(x_ptr, rows, row_mask, rx, stride_x, w_ptr, w_rows, w_mask, rw, stride_w, D,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 cosines of rows of X and rows of W, walking D in BLOCK_K steps."""
    dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for first in range(0, D, BLOCK_K):
        x = load_rows(x_ptr, rows, row_mask, stride_x, first, D, BLOCK_K)
        w = load_rows(w_ptr, w_rows, w_mask, stride_w, first, D, BLOCK_K)
        dots = tl.dot(x, tl.trans(w), dots, input_precision=DOT_PRECISION)
    # one factor rx rw (>= 2 / float32's largest for the op's rows: docs/design.md eq. (7a)): the raw
    # dot times rx alone can overflow for a class row past float32's largest norm
    return dots * (rx[:, None] * rw[None, :])


@triton.jit
def class_cosines(x_ptr, rows, row_mask, rx, stride_x, w_ptr, rw_ptr, classes, class_mask, stride_w, D,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Cosine of each row to each class, the max over its K sub-centre rows c*K + k, and the
    winning k (the lowest on ties)."""
    rw = tl.load(rw_ptr + classes * K, mask=class_mask, other=0.0)
    best = cosine(x_ptr, rows, row_mask, rx, stride_x, w_ptr, classes * K, class_mask, rw, stride_w, D,
                  BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    pick = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in tl.static_range(1, K):
        rw = tl.load(rw_ptr + classes * K + k, mask=class_mask, other=0.0)
        cos_k = cosine(x_ptr, rows, row_mask, rx, stride_x, w_ptr, classes * K + k, class_mask, rw, stride_w, D,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        pick = tl.where(cos_k > best, k, pick)
        # NaN-propagating, as torch.max: a NaN sub-centre row must not be skipped (a finite wrong loss)
        best = tl.maximum(best, cos_k, propagate_nan=tl.PropagateNan.ALL)
    return best, pick


@triton.jit
def load_hard_negatives(rows, row_mask, threshold_ptr, coeffs_ptr):
    """A row block's thresholds tau_i (+inf on padding rows: no entry is hard) and the map's
    (a, b, e) (arcface_kernels/negatives.py, docs/design.md section 3c), read on the device."""
    threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=float("inf")).to(tl.float32)
    a = tl.load(coeffs_ptr).to(tl.float32)
    b = tl.load(coeffs_ptr + 1).to(tl.float32)
    e = tl.load(coeffs_ptr + 2).to(tl.float32)
    return threshold, a, b, e


@triton.jit
def map_hard(cos, threshold, a, b, e):
    """Eq. (N1) on a tile: c (a c + b) + e where c > tau_i, c elsewhere. The mask does not exclude
    the target: both kernels overwrite the target entry afterwards. Cosines must be finite (the
    classes past the range are 0 here, masked after), or the unused branch would be NaN."""
    return tl.where(cos > threshold[:, None], cos * (a * cos + b) + e, cos)


@triton.jit
def cosine_gradient(cos, rows, row_mask, classes, class_mask, labels, lse, grad_rows, target_dcos, scale,
                    smoothing_per_class, threshold_ptr, coeffs_ptr, NONTARGET: tl.constexpr):
    """dloss/dcos of a tile (docs/design.md eqs. (15)-(17)): s * g * (p - eps/C) off the target,
    the row's target_dcos (computed once per row by the op) on it; 0 outside the valid classes.
    With the non-target epilogue (NONTARGET; the pointers are None without it) p is that of the
    mapped logit s * h(c) and hard entries take the factor dh/dc = 2 a c + b (eqs. (N1)-(N2)).
    Classes past the chunk (cosine 0, maybe "hard") are zeroed at the end."""
    is_target = classes[None, :] == labels[:, None]
    if NONTARGET:
        threshold, a, b, e = load_hard_negatives(rows, row_mask, threshold_ptr, coeffs_ptr)
        p = tl.exp(scale * map_hard(cos, threshold, a, b, e) - lse[:, None])
        slope = tl.where(cos > threshold[:, None], 2.0 * a * cos + b, 1.0)
        off_target = (p - smoothing_per_class) * (scale * grad_rows)[:, None] * slope
    else:
        p = tl.exp(scale * cos - lse[:, None])
        off_target = (p - smoothing_per_class) * (scale * grad_rows)[:, None]
    dcos = tl.where(is_target, target_dcos[:, None], off_target)
    return tl.where(class_mask[None, :], dcos, 0.0)
