"""Backward: two deterministic passes that recompute the cosine tiles (docs/design.md section 5).

With rx, rw the inverse norms, dcos the loss gradient per cosine and px_i, pw_j the projection
scales (rx_i^2, rw_j^2 where the norm exceeds eps, else 0, as through F.normalize):

    dX_i = rx_i * sum_j (dcos_ij rw_j) w_j - px_i rowsum_i(dcos * cos) x_i
    dW_j = rw_j * sum_i (dcos_ij rx_i) x_i - pw_j colsum_j(dcos * cos) w_j

Decomposition: a row-parallel pass for dX (each program owns a row block, a class split and a
column chunk of D, and writes its own float32 partial, summed over splits in a fixed order) and
a class-parallel pass for dW (each program owns a tile of weight rows and a column chunk, walks
every row block, and writes its rows once). Neither needs an atomic or a lock, so results are
bit-reproducible. The price is recomputing the cosines in both passes, once per column chunk:
(1 + 2 * (D / BLOCK_DOUT + 1)) x 2NCD flops for forward + backward against the minimum 4 x 2NCD.
The column chunks keep the float32 accumulators (BLOCK x BLOCK_DOUT) in registers without
spills (tests/test_triton_compile.py). Which trade-off wins on an H100 is still to be measured
(bench/TRITON_NOTES.md).
"""

import triton
import triton.language as tl

from .tiles import class_cosines, cosine_gradient, load_rows


@triton.jit
def grad_dot(scaled_dcos, rows, acc, GRAD_DOT_FP32: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """acc + scaled_dcos @ rows. The gradient tile can exceed float16's range (the target's
    dphi/dc grows like 1/sin(theta), inverse norms like 1/|v|), so float16 inputs take this
    product with float32 operands (tf32 on the tensor cores); bfloat16 has float32's range."""
    if GRAD_DOT_FP32:
        return tl.dot(scaled_dcos, rows.to(tl.float32), acc, input_precision=GRAD_PRECISION)
    return tl.dot(scaled_dcos.to(rows.dtype), rows, acc, input_precision=GRAD_PRECISION)


@triton.jit
def _row_terms(rows, row_mask, labels_ptr, m1_ptr, m2_ptr, m3_ptr, lse_ptr, grad_ptr):
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    m1 = tl.load(m1_ptr + rows, mask=row_mask, other=1.0)
    m2 = tl.load(m2_ptr + rows, mask=row_mask, other=0.0)
    m3 = tl.load(m3_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)  # 0 on ignored and padding rows
    return labels, m1, m2, m3, lse, grad


@triton.jit
def grad_x_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, x_proj_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr, lse_ptr, grad_ptr,
    dx_partial_ptr,
    N, C, D, stride_x, stride_w, classes_per_split, scale, smoothing, smoothing_per_class,
    K: tl.constexpr, EASY_MARGIN: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    first_col = tl.program_id(2) * BLOCK_DOUT
    row_mask = rows < N
    rx = tl.load(rx_ptr + rows, mask=row_mask, other=0.0)
    labels, m1, m2, m3, lse, grad = _row_terms(rows, row_mask, labels_ptr, m1_ptr, m2_ptr, m3_ptr, lse_ptr, grad_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_DOUT), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    start = split * classes_per_split
    stop = tl.minimum(start + classes_per_split, C)
    for first in range(start, stop, BLOCK_N):
        classes = first + tl.arange(0, BLOCK_N)
        class_mask = classes < stop
        cos, pick = class_cosines(x_ptr, rows, row_mask, rx, stride_x, w_ptr, rw_ptr, classes, class_mask,
                                  stride_w, D, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        dcos = cosine_gradient(cos, classes, class_mask, labels, m1, m2, m3, lse, grad, scale, smoothing,
                               smoothing_per_class, EASY_MARGIN, STRAIGHT_THROUGH)
        row_sum += tl.sum(dcos * cos, axis=1)
        for k in tl.static_range(K):
            # each class's gradient goes to its winning sub-centre row
            dcos_k = tl.where(pick == k, dcos, 0.0)
            w_rows = classes * K + k
            rw = tl.load(rw_ptr + w_rows, mask=class_mask, other=0.0)
            w = load_rows(w_ptr, w_rows, class_mask, stride_w, first_col, D, BLOCK_DOUT)
            acc = grad_dot(dcos_k * rw[None, :], w, acc, GRAD_DOT_FP32, GRAD_PRECISION)
    proj = tl.load(x_proj_ptr + rows, mask=row_mask, other=0.0)  # common.projection_scale
    x = load_rows(x_ptr, rows, row_mask, stride_x, first_col, D, BLOCK_DOUT).to(tl.float32)
    dx = rx[:, None] * acc - (proj * row_sum)[:, None] * x
    cols = first_col + tl.arange(0, BLOCK_DOUT)
    out = dx_partial_ptr + (split * N + rows[:, None]).to(tl.int64) * D + cols[None, :]
    tl.store(out, dx, mask=row_mask[:, None] & (cols[None, :] < D))


@triton.jit
def grad_w_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, w_proj_ptr, labels_ptr, m1_ptr, m2_ptr, m3_ptr, lse_ptr, grad_ptr,
    dw_ptr,
    N, C, D, stride_x, stride_w, stride_dw, scale, smoothing, smoothing_per_class, grad_limit,
    K: tl.constexpr, EASY_MARGIN: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    classes = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sub_centre = tl.program_id(1)  # this program writes weight rows classes * K + sub_centre
    first_col = tl.program_id(2) * BLOCK_DOUT
    class_mask = classes < C
    w_rows = classes * K + sub_centre
    rw = tl.load(rw_ptr + w_rows, mask=class_mask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DOUT), tl.float32)
    col_sum = tl.zeros((BLOCK_N,), tl.float32)
    for first in range(0, N, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        rx = tl.load(rx_ptr + rows, mask=row_mask, other=0.0)
        labels, m1, m2, m3, lse, grad = _row_terms(rows, row_mask, labels_ptr, m1_ptr, m2_ptr, m3_ptr, lse_ptr,
                                                   grad_ptr)
        cos, pick = class_cosines(x_ptr, rows, row_mask, rx, stride_x, w_ptr, rw_ptr, classes, class_mask,
                                  stride_w, D, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        dcos = cosine_gradient(cos, classes, class_mask, labels, m1, m2, m3, lse, grad, scale, smoothing,
                               smoothing_per_class, EASY_MARGIN, STRAIGHT_THROUGH)
        dcos = tl.where(pick == sub_centre, dcos, 0.0)
        col_sum += tl.sum(dcos * cos, axis=0)
        x = load_rows(x_ptr, rows, row_mask, stride_x, first_col, D, BLOCK_DOUT)
        acc = grad_dot(tl.trans(dcos * rx[:, None]), x, acc, GRAD_DOT_FP32, GRAD_PRECISION)
    proj = tl.load(w_proj_ptr + w_rows, mask=class_mask, other=0.0)  # common.projection_scale
    w = load_rows(w_ptr, w_rows, class_mask, stride_w, first_col, D, BLOCK_DOUT).to(tl.float32)
    dw = rw[:, None] * acc - (proj * col_sum)[:, None] * w
    dw = tl.minimum(tl.maximum(dw, -grad_limit), grad_limit)  # saturate, never overflow to inf
    cols = first_col + tl.arange(0, BLOCK_DOUT)
    out = dw_ptr + w_rows[:, None].to(tl.int64) * stride_dw + cols[None, :]
    tl.store(out, dw.to(dw_ptr.dtype.element_ty), mask=class_mask[:, None] & (cols[None, :] < D))
