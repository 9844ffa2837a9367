"""The chunked backward every compiled backend shares (docs/design.md section 5).

A backend supplies only the gradient tile of a class chunk,

    fill_grad(first_class, stop_class, out)   writes G = dcos * rx * rw^T of weight rows
                                              [first_class * K, stop_class * K) into `out`
                                              (N, (stop_class - first_class) * K), grad_dtype,
                                              columns contiguous, rows a full chunk apart (the
                                              last chunk's rows are padded);
                                              dcos routed to each class's winning sub-centre row,
                                              0 on the others,

and `chunked_backward` does the rest with tensor-core GEMMs through torch (float16 inputs: on
exact bfloat16 pieces of the operands, `split_operands`):

    B   += G W_c                       float32, accumulated over chunks in a fixed order
    A_c  = G^T X                       float32
    dW_c = A_c - (u . A_c) u           the tangent projection, written once per weight row
    dX   = B - (u . B) u               once, at the end

(u = f v the unit row, f = common.projection_factor of the inverse norm: 0 on rows clamped at
eps; eqs. (23)-(24b)). The normalization terms need no pass
over the tile because rowsum(dcos * cos) = x . (G W) and colsum(dcos * cos) = w . (G^T X).
One gradient buffer (N rows of a full chunk) is reused by every chunk, so G's leading dimension is
the full chunk's in the last chunk too (a multiple of `align` classes: 16-byte aligned rows for
cuBLAS's TMA kernels); its size is bounded by the workspace budget and
by GRAD_BUFFER_BYTES (it should stay in L2 between the kernel that writes it and the two GEMMs
that read it), never by C. No atomics, fixed chunk order: bit-reproducible.
"""

import torch

from .common import get_workspace_budget, projection_factor

# Largest gradient buffer: it stays resident in an H100's 50 MB L2 between writer and readers.
GRAD_BUFFER_BYTES = 32 * 2**20


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of G for inputs of `dtype`.

    bfloat16 for bfloat16: tensor cores, float32's exponent range (G can exceed float16's:
    dphi/dc grows like 1 / sin(theta), inverse norms like 1 / |v|). float16 inputs take float32
    G, and their GEMMs run on bfloat16 pieces (`split_operands`): float16 operands split exactly
    into two bfloat16 pieces, so W keeps its direction. Rounding a float16 W to bfloat16 instead
    turns a class centre parallel to an embedding into a non-parallel one, and the tangent
    projection of dX (eq. (23)) then keeps an error of order |G_iy| * 2^-9, which at theta -> 0
    (dphi/dc ~ 1 / SIN_FLOOR) is larger than the gradient itself. float32 and float64 keep
    their own dtype."""
    return torch.bfloat16 if dtype == torch.bfloat16 else (torch.float64 if dtype == torch.float64 else torch.float32)


def split_operands(dtype: torch.dtype) -> bool:
    """Do the gradient GEMMs of inputs of `dtype` run on bfloat16 hi + lo pieces (float16 inputs)?

    v = hi + lo with hi = bf16(v), lo = bf16(v - hi): exact for a float16 v (11 significant bits
    = 8 + 3), 16 significant bits of a float32 G (TF32 keeps 11). A product of two split operands
    takes all four piece products: dropping lo lo (2^-17 relative) would leave an error that is
    not along W's direction, which the tangent projection (eq. (23)) cannot remove and the large
    G of a nearly parallel target (dphi/dc ~ 1 / SIN_FLOOR) amplifies past the gradient itself.
    Four bf16 tensor-core GEMMs with float32 accumulation take twice the time of the two TF32
    GEMMs they replace, with no global TF32 switch (process-wide: other threads, e.g. autograd's
    per-device workers, would see it) and whatever the user's matmul setting."""
    return dtype == torch.float16


def _pieces(v: torch.Tensor, split: bool, dtype: torch.dtype) -> tuple:
    """v as GEMM operands: (hi, lo) bfloat16 pieces when split, else (v in dtype,)."""
    if not split:
        return (v.to(dtype),)
    hi = v.to(torch.bfloat16)
    return hi, (v.to(torch.float32) - hi).to(torch.bfloat16)


def workspace_bytes_per_row(n_rows: int, dim: int, grad_dtype: torch.dtype, split: bool = False) -> int:
    """Workspace one weight row of a chunk costs: its column of G, its float32 rows of A_c and of
    w_c, and w_c as GEMM operands; with split operands also G's and w_c's bfloat16 pieces and the
    float32 remainder each split makes."""
    if split:
        return n_rows * (grad_dtype.itemsize + 8) + dim * (8 + 8)
    return n_rows * grad_dtype.itemsize + dim * (8 + grad_dtype.itemsize)


def chunk_classes(n_rows, n_classes, sub_centers, dim, grad_dtype, budget=None, align=1, split=False) -> int:
    """Classes per chunk: G within GRAD_BUFFER_BYTES and the chunk's workspace within the budget,
    rounded down to a multiple of `align` (a kernel's class tile) when at least one such multiple
    fits."""
    budget = get_workspace_budget() if budget is None else budget
    n_rows = max(n_rows, 1)
    by_buffer = GRAD_BUFFER_BYTES // (n_rows * grad_dtype.itemsize * sub_centers)
    by_budget = budget // (workspace_bytes_per_row(n_rows, dim, grad_dtype, split) * sub_centers)
    classes = max(1, min(by_buffer, by_budget, n_classes))
    return classes // align * align if classes >= align else classes


# aten::addmm.dtype_out (CUDA): B accumulated in place, with no new tensor per chunk.
_ADDMM_DTYPE_OUT = "dtype_out" in torch.ops.aten.addmm.overloads()


def _matmul_fp32(a, b, accumulate=None):
    """a @ b (+ accumulate) with a float32 result. On a GPU low-precision operands stay in their
    dtype on the tensor cores and accumulate in float32 (aten mm.dtype / addmm.dtype, CUDA only),
    unless TunableOp is on (it rejects out_dtype): then, and on the CPU (tests), they are upcast."""
    if a.dtype != torch.float32 and a.dtype != torch.float64:
        if a.is_cuda and not torch.cuda.tunable.is_enabled():
            if accumulate is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            if _ADDMM_DTYPE_OUT:
                return torch.addmm(accumulate, a, b, out_dtype=torch.float32, out=accumulate)
            return torch.addmm(accumulate, a, b, out_dtype=torch.float32)
        a, b = a.float(), b.float()
    if accumulate is None:
        return a @ b
    return accumulate.addmm_(a, b)


def _product(a_pieces, b_pieces, accumulate=None):
    """sum of a_i @ b_j over all pieces (+ accumulate), float32 (split_operands)."""
    out = accumulate
    for a in a_pieces:
        for b in b_pieces:
            out = _matmul_fp32(a, b, out)
    return out


def project_rows(grad, v, factor, out):
    """out = grad - (u . grad) u per row, u = factor * v the unit row (the normalization term of
    the gradient, eqs. (23)-(24b): factor = common.projection_factor of the row's inverse norm),
    rounded to nearest into out's dtype (inf where it overflows). In torch element-wise ops; a
    backend may pass a fused kernel with the same signature to chunked_backward."""
    unit = v.to(grad.dtype) * factor[:, None]
    out.copy_(grad - (unit * grad).sum(1)[:, None] * unit)


def chunked_backward(x, w, norms, sub_centers, grad_dtype, fill_grad, dw_dtype, workspace_budget=None, align=1,
                     project=project_rows):
    """(dx float32 (N, D), dw in dw_dtype (C * K, D)) from the backend's `fill_grad` (module
    docstring). `align`: chunks hold a multiple of this many classes (the backend's tile width).
    `project`: the row projection (project_rows, or a backend's fused kernel). float64 inputs give
    float64 dx."""
    n, dim = x.shape
    k = sub_centers
    n_classes = w.shape[0] // k
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = torch.zeros(n, dim, dtype=acc_dtype, device=x.device)
    dw = torch.empty(w.shape, dtype=dw_dtype, device=w.device)
    if n_classes == 0:
        return b, dw
    split = split_operands(x.dtype)
    step = chunk_classes(n, n_classes, k, dim, grad_dtype, workspace_budget, align, split)
    buffer = torch.empty(n, step * k, dtype=grad_dtype, device=x.device)
    x_pieces = _pieces(x, split, grad_dtype)
    factor_w = projection_factor(norms.rw)
    for first in range(0, n_classes, step):
        stop = min(first + step, n_classes)
        rows = slice(first * k, stop * k)
        g = buffer[:, : (stop - first) * k]
        fill_grad(first, stop, g)
        w_rows = w[rows]
        g_pieces = _pieces(g, split, grad_dtype)
        b = _product(g_pieces, _pieces(w_rows, split, grad_dtype), accumulate=b)
        a = _product([p.T for p in g_pieces], x_pieces)
        project(a, w_rows, factor_w[rows], dw[rows])
    dx = torch.empty_like(b)
    project(b, x, projection_factor(norms.rx), dx)
    return dx, dw
