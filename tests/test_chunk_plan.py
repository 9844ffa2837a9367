"""The shared chunked backward (backends/chunk_plan.py) against autograd through F.normalize in
float64, with a gradient tile written by a plain torch fill_grad: several chunks, sub-centres,
zero rows; and the chunk sizing rules."""

import pytest
import torch
import torch.nn.functional as F

from arcface_kernels.backends.chunk_plan import (
    GRAD_BUFFER_BYTES,
    _pieces,
    chunk_classes,
    chunked_backward,
    gradient_dtype,
    split_operands,
)
from arcface_kernels.backends.common import float32_matmul_uses_tf32, row_norms
from helpers import rel_err


def _problem(n, c, d, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    dcos = torch.randn(n, c * k, generator=g, dtype=torch.float64)
    x[1] = 0.0  # a zero row: its normalization term vanishes, as through F.normalize
    return x.to(dtype), w.to(dtype), dcos


def _autograd(x, w, dcos):
    x = x.double().requires_grad_(True)
    w = w.double().requires_grad_(True)
    (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T * dcos).sum().backward()
    return x.grad, w.grad


def _plan(x, w, dcos, k, grad_dtype, budget, dw_dtype=None):
    norms = row_norms(x, w)
    chunks = []

    def fill_grad(first, stop, out):
        chunks.append((first, stop))
        rows = slice(first * k, stop * k)
        out.copy_(dcos[:, rows] * norms.rx.double()[:, None] * norms.rw.double()[None, rows])

    dx, dw = chunked_backward(x, w, norms, k, grad_dtype, fill_grad, dw_dtype or w.dtype, workspace_budget=budget)
    return dx, dw, chunks


@pytest.mark.parametrize("k", [1, 3])
def test_matches_autograd_in_float64_over_several_chunks(k):
    x, w, dcos = _problem(9, 13, 6, k, torch.float64)
    dx, dw, chunks = _plan(x, w, dcos, k, torch.float64, budget=600)
    assert len(chunks) > 3 and chunks[0][0] == 0 and chunks[-1][1] == 13
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), "chunks must tile the classes in order"
    ref_dx, ref_dw = _autograd(x, w, dcos)
    assert rel_err(dx, ref_dx) < 1e-12 and rel_err(dw, ref_dw) < 1e-12


def test_gradient_dtypes():
    assert gradient_dtype(torch.bfloat16) == torch.bfloat16
    assert gradient_dtype(torch.float16) == torch.float32  # GEMMs on exact bfloat16 pieces (split_operands)
    assert gradient_dtype(torch.float32) == torch.float32 and gradient_dtype(torch.float64) == torch.float64


def test_float16_inputs_within_float16_tolerance():
    x, w, dcos = _problem(16, 40, 32, 1, torch.float16, seed=3)
    dx, dw, _ = _plan(x, w, dcos, 1, gradient_dtype(x.dtype), budget=4096)
    ref_dx, ref_dw = _autograd(x, w, dcos)
    assert dx.dtype == torch.float32 and dw.dtype == torch.float16
    assert rel_err(dx, ref_dx) < 1e-4 and rel_err(dw, ref_dw) < 5e-3  # dw rounded once to float16


def test_split_pieces_hold_float16_exactly_and_float32_to_16_bits():
    # float16 operands split into bfloat16 hi + lo with nothing lost (W keeps its direction); a
    # float32 G keeps 16 significant bits, more than TF32's 11 (chunk_plan.split_operands).
    assert split_operands(torch.float16) and not split_operands(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4096, generator=g) * torch.logspace(-7, 4, 4096)
    halves = torch.cat([v.half(), torch.tensor([65504.0, -65504.0, 6e-8, 2.0**-14]).half()])
    hi, lo = _pieces(halves, True, torch.float32)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.float() + lo.float(), halves.float())
    hi, lo = _pieces(v, True, torch.float32)
    assert ((hi.double() + lo.double() - v.double()).abs() <= 2.0**-16 * v.double().abs()).all()


def test_tf32_setting_read_through_the_current_api():
    # torch >= 2.9: once fp32_precision is set, reading the legacy allow_tf32 raises
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        for value, expected in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = value
            assert float32_matmul_uses_tf32() is expected
    finally:
        matmul.fp32_precision = before


def test_dw_in_the_master_dtype_and_overflow_to_inf():
    # float16 operands, a float32 master weight: dW accumulated and written in float32, never
    # rounded through float16 on the way.
    x, w, dcos = _problem(16, 40, 32, 1, torch.float16, seed=3)
    ref_dx, ref_dw = _autograd(x, w, dcos)
    _, dw, _ = _plan(x, w, dcos, 1, gradient_dtype(x.dtype), budget=4096, dw_dtype=torch.float32)
    assert dw.dtype == torch.float32 and rel_err(dw, ref_dw) < 1e-5
    # Gradients beyond float16's range (a GradScaler's 2**16 on a large gradient) are inf, as a
    # cast gives them, never clamped to 65504: the scaler must see the overflow.
    big = 2.0**16 * 40
    dx, dw, _ = _plan(x, w, dcos * big, 1, gradient_dtype(x.dtype), budget=4096)
    ref = ref_dw * big
    over = ref.abs() > torch.finfo(torch.float16).max + 16  # past the midpoint that rounds to inf
    assert over.any() and torch.isinf(dw[over]).all()
    assert rel_err(dw[~over], ref[~over]) < 5e-3
    assert torch.isfinite(dx).all()  # dx stays float32 (the op rounds it into the embeddings' dtype)


def test_chunk_sizing():
    # the budget bounds the chunk's workspace, GRAD_BUFFER_BYTES the gradient buffer
    assert chunk_classes(4096, 262144, 1, 512, torch.bfloat16, budget=2**40) * 4096 * 2 == GRAD_BUFFER_BYTES
    small = chunk_classes(64, 10**6, 1, 16, torch.float32, budget=64 * 1024)
    assert small * (64 * 4 + 16 * 12) <= 64 * 1024
    assert chunk_classes(64, 10**6, 1, 16, torch.float32, budget=64 * 1024, align=16) % 16 == 0
    assert chunk_classes(8, 5, 2, 4, torch.float32, budget=2**30) == 5  # never more than C
    assert chunk_classes(8, 5, 2, 4, torch.float32, budget=1) == 1  # always at least one class
