"""The `torch` backend's fused CPU epilogue (csrc/cpu_epilogue.cpp) against the same chunk loop in
torch ops (backends/chunked.py with the extension switched off) and the float64 oracle."""

import math

import pytest
import torch
from float64_oracle import oracle

import arcface_kernels as ak
from arcface_kernels.backends import chunked, row_norms
from helpers import TOL, CountingOps, loss_and_grads, make_problem, rel_err

needs_ops = pytest.mark.skipif(chunked._CPU_OPS is None,
                               reason="arcface_kernels._cpu not built")
SPEC = dict(scale=30.0, m1=1.0, m2=0.4, m3=0.05)


@pytest.fixture
def torch_ops_only(monkeypatch):
    """Run the `torch` backend on torch ops alone, as without the extension."""
    monkeypatch.setattr(chunked, "_CPU_OPS", None)


def _both_ways(monkeypatch, fn):
    fused = fn()
    with monkeypatch.context() as m:
        m.setattr(chunked, "_CPU_OPS", None)
        plain = fn()
    return fused, plain


def _stats(x, w, y, **settings):
    options = ak.LossOptions(**settings).for_rows(x.shape[0], x.device, torch.float32)
    return chunked.forward(x, w, y, options, row_norms(x, w))


def test_switch_follows_the_extension(monkeypatch):
    assert not chunked.fused_epilogue(torch.device("meta"))
    monkeypatch.setattr(chunked, "_CPU_OPS", None)
    assert not chunked.fused_epilogue(torch.device("cpu"))
    x, w, y = make_problem(5, 11, 4, seed=1)
    assert math.isfinite(float(ak.margin_softmax_loss(x, w, y, backend="torch")))  # runs on torch ops


@needs_ops
def test_fused_path_is_taken_on_a_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(chunked, "_CPU_OPS", CountingOps(calls))
    x, w, y = make_problem(6, 20, 8, seed=2)
    with ak.workspace_budget(1):  # a class per chunk
        loss_and_grads(x, w, y, backend="torch")
    assert {"forward_tile", "backward_tile", "project_chunk"} <= set(calls) and calls.count("forward_tile") > 1


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k, smoothing", [(1, 0.0), (1, 0.1), (3, 0.0), (2, 0.2)])
def test_fused_matches_torch_ops_and_oracle(monkeypatch, dtype, k, smoothing):
    x, w, y = make_problem(13, 37, 19, k=k, dtype=dtype, seed=3, ignore=(4,))
    settings = dict(SPEC, sub_centers=k, label_smoothing=smoothing, reduction="none")

    def run():
        with ak.workspace_budget(6000):  # a few classes per chunk
            return loss_and_grads(x, w, y, backend="torch", **settings)

    fused, plain = _both_ways(monkeypatch, run)
    want = oracle(x.double(), w.double(), y, scale=SPEC["scale"], m1=SPEC["m1"], m2=SPEC["m2"], m3=SPEC["m3"],
                  k=k, eps=smoothing, reduction="none", row_weights=torch.linspace(0.5, 1.5, 13, dtype=torch.float64))
    for name, f, p, o in zip(("loss", "dX", "dW"), fused, plain, want):
        assert f.dtype == p.dtype
        assert rel_err(f, p) < (1e-5 if dtype == torch.float32 else TOL[dtype] / 4), name
        assert rel_err(f, o) < TOL[dtype], name


@needs_ops
@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_row(monkeypatch, n):
    x, w, y = make_problem(n, 9, 5, seed=4)
    fused, plain = _both_ways(monkeypatch, lambda: loss_and_grads(x, w, y, backend="torch", reduction="sum"))
    for f, p in zip(fused, plain):
        assert f.shape == p.shape and torch.allclose(f, p, rtol=1e-5, atol=1e-7)


@needs_ops
def test_top1_ties_take_the_lowest_class(monkeypatch):
    # classes 2, 5 and 9 share a centre, so do 1 and 7; row 0's target is 5 (ties with 2 and 9),
    # row 1's is 1 (the lower of its tie), row 2 has no target; chunks of 3 classes split the ties
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 6, generator=g)
    w[5] = w[9] = w[2]
    w[7] = w[1]
    x = torch.stack([w[2], w[1], w[7], 0.1 * w[3] + w[9]])
    y = torch.tensor([5, 1, -100, 10])
    with ak.workspace_budget(1):
        fused, plain = _both_ways(monkeypatch, lambda: _stats(x, w, y, **SPEC))
    assert fused.best_class.tolist() == plain.best_class.tolist() == [2, 1, 1, 2]
    for name in ("row_max", "sum_exp", "nontarget_sum_exp", "best_cos"):
        f, p = getattr(fused, name), getattr(plain, name)
        assert torch.allclose(f, p, rtol=1e-6), name
    # a target parallel to its row: acos amplifies the cosine's last-bit rounding (d acos / dc -> inf)
    assert torch.allclose(fused.target_logit, plain.target_logit, atol=1e-3)


@needs_ops
def test_extreme_logits_and_nan_rows(monkeypatch):
    # s = 1e4: exp underflows to 0 for everything but the row max; row 1 holds a NaN, row 2 is ignored
    x, w, y = make_problem(5, 40, 7, seed=6, ignore=(2,))
    x[1, 3] = float("nan")
    with ak.workspace_budget(2000):
        fused, plain = _both_ways(monkeypatch, lambda: _stats(x, w, y, scale=1e4, m2=0.5, label_smoothing=0.1))
    for name in ("row_max", "sum_exp", "nontarget_sum_exp", "target_logit", "logit_sum", "best_cos"):
        f, p = getattr(fused, name), getattr(plain, name)
        assert torch.isnan(f[1]), name
        keep = torch.tensor([0, 2, 3, 4])
        assert torch.allclose(f[keep], p[keep], rtol=1e-6, equal_nan=False), name
    keep = [0, 2, 3, 4]
    assert fused.best_class[keep].tolist() == plain.best_class[keep].tolist()
    loss = ak.margin_softmax_loss(x, w, y, scale=1e4, reduction="none", backend="torch")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 3, 4]]).all() and loss[2] == 0


@needs_ops
def test_float64_stays_float64(monkeypatch):
    x, w, y = make_problem(6, 17, 5, k=2, dtype=torch.float64, seed=7, ignore=(0,))
    with ak.workspace_budget(500):
        got = loss_and_grads(x, w, y, backend="torch", sub_centers=2, label_smoothing=0.1, **SPEC)
    want = oracle(x, w, y, k=2, eps=0.1, **SPEC)
    for g, o in zip(got, want):
        assert g.dtype == torch.float64 and rel_err(g, o) < 1e-12


@needs_ops
def test_baseline_and_avx2_row_kernels_agree(tmp_path):
    # ATEN_CPU_CAPABILITY=default makes torch, and with it the epilogue, take the baseline kernels
    import os
    import subprocess
    import sys

    if torch.ops.arcface_kernels_cpu.vector_isa() != "avx2":
        pytest.skip("this CPU runs the baseline kernels only")
    # the plain kernels, and the mapped ones of the non-target epilogue (K = 1 float32: raw_w too)
    code = ("import sys, torch, arcface_kernels as ak; from helpers import loss_and_grads, make_problem\n"
            "x, w, y = make_problem(9, 41, 21, k=2, seed=8, ignore=(3,))\n"
            "with ak.workspace_budget(3000):\n"
            "    out = loss_and_grads(x, w, y, backend='torch', sub_centers=2, label_smoothing=0.1, reduction='none')\n"
            "    out += loss_and_grads(x, w[::2].contiguous(), y, backend='torch', label_smoothing=0.1,\n"
            "                          reduction='none', nontarget='curricular', nontarget_t=0.3, scale=8.0, m2=0.1)\n"
            "    out += loss_and_grads(x.bfloat16(), w[::2].bfloat16(), y, backend='torch', reduction='none')\n"
            "torch.save((torch.ops.arcface_kernels_cpu.vector_isa(), out), sys.argv[1])\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
               PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    isa, baseline = torch.load(tmp_path / "out.pt")
    assert isa == "baseline"
    x, w, y = make_problem(9, 41, 21, k=2, seed=8, ignore=(3,))
    with ak.workspace_budget(3000):
        avx2 = loss_and_grads(x, w, y, backend="torch", sub_centers=2, label_smoothing=0.1, reduction="none")
        avx2 += loss_and_grads(x, w[::2].contiguous(), y, backend="torch", label_smoothing=0.1, reduction="none",
                               nontarget="curricular", nontarget_t=0.3, scale=8.0, m2=0.1)
        # bfloat16: row_scale and the bfloat16 class rows of project_chunk (with bf16_gemm here)
        avx2 += loss_and_grads(x.bfloat16(), w[::2].bfloat16(), y, backend="torch", reduction="none")
    assert len(baseline) == len(avx2) == 9
    for base, vec in zip(baseline, avx2):
        # another exp and lane order: rounding only (a bfloat16 gradient: a last bit here and there)
        assert rel_err(base, vec) < (1e-5 if vec.dtype != torch.bfloat16 else 1e-3)


@needs_ops
def test_the_mapped_ops_check_their_arguments():
    """The non-target epilogue's threshold and coefficients go together, and the mapped backward
    needs lse (its tile holds Z, not Z - lse)."""
    ops = torch.ops.arcface_kernels_cpu
    n, width = 3, 5
    p, labels, target_p = torch.zeros(n, width), torch.zeros(n, dtype=torch.int64), torch.zeros(n)
    threshold, coeffs = torch.zeros(n), torch.zeros(3)
    with pytest.raises(RuntimeError, match="lse is given exactly"):
        ops.backward_tile(p, labels, 0, target_p, 0.0, None, None, threshold, coeffs)
    with pytest.raises(RuntimeError, match="go together"):
        ops.backward_tile(p, labels, 0, target_p, 0.0, None, torch.zeros(n), threshold, None)
    with pytest.raises(RuntimeError, match="coeffs"):
        ops.backward_tile(p, labels, 0, target_p, 0.0, None, torch.zeros(n), threshold, torch.zeros(2))
    stats = [torch.zeros(n) for _ in range(5)]
    with pytest.raises(RuntimeError, match="threshold"):
        ops.forward_tile(p, labels, 0, *stats[:3], torch.zeros(n, dtype=torch.int64), *stats[3:], False, None,
                         torch.zeros(n + 1), coeffs)
