"""Backward: the gradient-tile kernel that the shared chunk plan (backends/chunk_plan.py) calls
once per class chunk (docs/design.md sections 5-6).

Each program owns a (row block, class block) of the chunk: it recomputes the cosines (the
forward's mainloop, 1 x 2NCD over all chunks), turns them into dcos (eqs. (15)-(17); the target
entry takes the op's per-row target_dcos, so no margin math runs here; with the non-target
epilogue, a NONTARGET variant, hard entries take eqs. (N1)-(N2)), routes each class's
gradient to its winning sub-centre (eq. (18)) and writes G = dcos * rx * rw^T (eq. (19)) in the
buffer's dtype. The plan then runs the two gradient GEMMs (B += G W_c, A_c = G^T X) and the
tangent projections (project_rows_kernel), so no row or column sums of the tile are ever formed.
Every entry of G is written by exactly one program: no atomics, bit-reproducible.
"""

import triton
import triton.language as tl

from .tiles import class_cosines, cosine_gradient


@triton.jit
def grad_tile_kernel(
    x_ptr, w_ptr, rx_ptr, rw_ptr, labels_ptr, lse_ptr, grad_ptr, target_dcos_ptr, threshold_ptr, coeffs_ptr, g_ptr,
    N, first_class, stop_class, D, stride_x, stride_w, stride_g, scale, smoothing_per_class,
    K: tl.constexpr, NONTARGET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    classes = first_class + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    class_mask = classes < stop_class
    rx = tl.load(rx_ptr + rows, mask=row_mask, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)  # 0 on ignored and padding rows
    target_dcos = tl.load(target_dcos_ptr + rows, mask=row_mask, other=0.0)
    cos, pick = class_cosines(x_ptr, rows, row_mask, rx, stride_x, w_ptr, rw_ptr, classes, class_mask, stride_w, D,
                              K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    dcos = cosine_gradient(cos, rows, row_mask, classes, class_mask, labels, lse, grad, target_dcos, scale,
                           smoothing_per_class, threshold_ptr, coeffs_ptr, NONTARGET)
    scaled = dcos * rx[:, None]
    mask = row_mask[:, None] & class_mask[None, :]
    for k in tl.static_range(K):
        rw = tl.load(rw_ptr + classes * K + k, mask=class_mask, other=0.0)
        g = tl.where(pick == k, scaled, 0.0) * rw[None, :]
        cols = (classes - first_class) * K + k
        out = g_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :]
        tl.store(out, g.to(g_ptr.dtype.element_ty), mask=mask)


# float32's smallest normal value
_SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def project_rows_kernel(grad_ptr, v_ptr, factor_ptr, out_ptr, R, D, stride_grad, stride_v, stride_out,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = grad - (u . grad) u per row, u = f v the unit row (f: common.projection_factor, 0 on
    rows clamped at eps), rounded to nearest into out's dtype (inf where it overflows, never
    clamped), in one pass over a whole row (BLOCK_D >= D): the dW / dX tail of the chunk plan
    (eqs. (23)-(24b)) at 4 + 2 + 2 bytes per entry for bf16. Per row a = (v . grad) f = u . grad
    and the coefficient of v, a f; a program whose rows all have a normal (or exactly zero)
    coefficient takes grad - (a f) v, the same work per entry as grad - f^2 (v . grad) v; one with
    a row whose a f underflows (norm past about 2**63) forms u per entry instead (eq. (24b))."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    r64 = rows[:, None].to(tl.int64)
    grad = tl.load(grad_ptr + r64 * stride_grad + cols[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + r64 * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    factor = tl.load(factor_ptr + rows, mask=rows < R, other=0.0)
    along = tl.sum(v * grad, axis=1) * factor
    coef = along * factor
    per_row = (tl.abs(coef) >= _SMALLEST_NORMAL) | (along == 0.0)  # False on NaN: it propagates either way
    out_ptrs = out_ptr + r64 * stride_out + cols[None, :]
    # the store in each branch: a common tail after them would take the subtraction out of the
    # multiply-add (or speculate the per-entry product on every program)
    if tl.min(per_row.to(tl.int32), axis=0) == 1:
        tl.store(out_ptrs, (grad - coef[:, None] * v).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, (grad - along[:, None] * (v * factor[:, None])).to(out_ptr.dtype.element_ty), mask=mask)
