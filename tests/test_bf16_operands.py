"""bfloat16 inputs on the CPU: the class walk's GEMMs on the operands as given with float32
accumulation (csrc/cpu_bf16_gemm.cpp, backends/chunked.py `_Walk.bf16`), against float64."""

import pytest
import torch
from float64_oracle import oracle

import arcface_kernels as ak
from arcface_kernels.backends import chunked, row_norms
from helpers import CountingOps, loss_and_grads, make_problem, rel_err

BF16 = torch.bfloat16
needs_bf16_gemm = pytest.mark.skipif(not chunked.bf16_gemm(BF16),
                                     reason="no float32-output bfloat16 GEMM in this torch (or _cpu not built)")
SPEC = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
# a gradient rounded once into bfloat16, with room for G's own rounding into bfloat16 (2.3e-3
# measured at (300, 20000, 128); the float64 gradient rounded once: 1.7e-3)
GRAD_TOL = 4e-3


def _ops():
    return torch.ops.arcface_kernels_cpu


@needs_bf16_gemm
@pytest.mark.parametrize("a_t, b_t", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_bf16_gemm_is_exact_accumulation(a_t, b_t, beta):
    g = torch.Generator().manual_seed(0)
    m, k, n = 37, 67, 29
    a = torch.randn(k, m, generator=g).to(BF16).T if a_t else torch.randn(m, k, generator=g).to(BF16)
    b = torch.randn(n, k, generator=g).to(BF16).T if b_t else torch.randn(k, n, generator=g).to(BF16)
    big = torch.randn(m, n + 5, generator=g)
    out, beyond = big[:, :n], big[:, n:].clone()  # out's rows have a stride past its width
    want = a.double() @ b.double() + beta * out.double()
    _ops().bf16_gemm(out, a, b, beta)
    assert rel_err(out, want) < 1e-6  # exact products of bfloat16 values, float32 sums
    assert torch.equal(big[:, n:], beyond)  # the columns past out's width untouched


@needs_bf16_gemm
def test_bf16_gemm_edges_and_refusals():
    a, b = torch.ones(3, 0, dtype=torch.bfloat16), torch.ones(0, 4, dtype=torch.bfloat16)
    out = torch.full((3, 4), 2.0)
    _ops().bf16_gemm(out, a, b, 0.5)  # K = 0: out = beta out
    assert torch.equal(out, torch.ones(3, 4))
    out.fill_(float("nan"))
    _ops().bf16_gemm(out, a, b)  # K = 0, beta = 0: zeros, whatever out held (an N = 0 batch's A_c)
    assert torch.equal(out, torch.zeros(3, 4))
    x = torch.ones(4, 6, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 a and b"):
        _ops().bf16_gemm(torch.empty(4, 4), x, x.T.half())
    with pytest.raises(RuntimeError, match="contiguous rows or contiguous columns"):
        _ops().bf16_gemm(torch.empty(4, 4), x, torch.ones(6, 8, dtype=torch.bfloat16)[:, ::2])
    with pytest.raises(RuntimeError, match="float32 with contiguous rows"):
        _ops().bf16_gemm(torch.empty(4, 4, dtype=torch.bfloat16), x, x.T)


@needs_bf16_gemm
def test_walk_reads_bf16_operands_as_given(monkeypatch):
    calls = []
    x, w, y = make_problem(9, 40, 8, dtype=BF16, seed=1)
    walk = chunked._Walk(x, w, y, ak.LossOptions(**SPEC).for_rows(9, x.device, torch.float32), row_norms(x, w))
    assert walk.bf16 and walk.raw_w and walk.w_buffer is None and walk.xs is x  # no float32 copies
    monkeypatch.setattr(chunked, "_CPU_OPS", CountingOps(calls))
    with ak.workspace_budget(1):  # a class per chunk: 40 chunks
        loss_and_grads(x, w, y, backend="torch", **SPEC)
    # forward: one GEMM a chunk; backward: the recompute, B += G W_c and A_c = G^T X
    assert calls.count("bf16_gemm") == 4 * 40


@needs_bf16_gemm
@pytest.mark.parametrize("n", [0, 1, 37])
def test_bf16_walk_matches_float64(n):
    # odd sizes over several chunks, an ignored row, per-row margins, smoothing, a zero row and a
    # zero class row, a huge-norm row and a target parallel to its class row
    x, w, y = make_problem(n, 301, 67, dtype=BF16, seed=2, ignore=(3,) if n > 3 else ())
    w[7] = 0
    if n > 5:
        x[4] = 0
        x[5] = x[5] * 2.0 ** 100
        x[1] = w[y[1]]
    m2 = torch.linspace(0.2, 0.6, n)
    settings = dict(SPEC, m2=m2, label_smoothing=0.1)
    with ak.workspace_budget(20_000):  # tens of classes per chunk
        loss, dx, dw = loss_and_grads(x, w, y, backend="torch", **settings)
    want_loss, want_dx, want_dw = oracle(x.double(), w.double(), y, scale=SPEC["scale"], m2=m2.double(), eps=0.1)
    assert dx.dtype == dw.dtype == BF16
    assert rel_err(loss, want_loss) < 1e-5  # float32 accumulation: the loss of exact bfloat16 inputs
    assert rel_err(dx, want_dx) < GRAD_TOL and rel_err(dw, want_dw) < GRAD_TOL
    # the zero rows' gradients are 1 / eps times a tangent term: large, finite in bfloat16
    if n > 5:
        assert rel_err(dx[4], want_dx[4]) < GRAD_TOL
    assert rel_err(dw[7], want_dw[7]) < GRAD_TOL
