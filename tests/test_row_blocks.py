"""The `torch` backend's forward with gradients on a CPU (backends/row_blocks.py, one op of the CPU
extension: csrc/cpu_row_blocks.cpp): the gradients of a "mean" or "sum" loss made in forward from
tiles kept per block of rows, 3 GEMMs of 2NCD flops in all. Checked against the independent
float64 oracle over several row blocks and class chunks, and against the class walk's torch ops
on edge rows, with the walk and the fallbacks (the backward op, the class walk for float64)
observed, and its memory within the budget."""

import dataclasses

import pytest
import torch
from float64_oracle import oracle
from torch.profiler import profile

import arcface_kernels as ak
from arcface_kernels import op
from arcface_kernels.backends import chunked, common, registry, row_blocks
from arcface_kernels.options import LossOptions
from bench.live_bytes import LiveBytes
from helpers import TOL, make_problem, rel_err

pytestmark = pytest.mark.skipif(chunked._CPU_OPS is None,
                                reason="the CPU extension (arcface_kernels._cpu) is not built")

N, C, D = 150, 203, 19


def _budget_for_rows(rows, n, c, d, itemsize):
    """A workspace budget that gives blocks of `rows` rows (row_blocks.block_rows)."""
    return rows * (c + d) * itemsize + 2 * n * d * itemsize


@pytest.fixture
def walk_spy(monkeypatch):
    """Counts the row-block walks that made gradients and the backend backward calls; chunks of
    at most 40 classes."""
    monkeypatch.setattr(common, "CPU_TILE_BYTES", 40 * 64 * 8)
    seen = {"walks": 0, "backward": 0}
    walk, backward = row_blocks.forward_with_gradients, chunked.backward

    def counting_walk(*args):
        result = walk(*args)
        seen["walks"] += result is not None
        return result

    def counting_backward(*args):
        seen["backward"] += 1
        return backward(*args)

    backend = registry.get_backend("torch")
    monkeypatch.setitem(registry._BACKENDS, "torch", dataclasses.replace(
        backend, forward_with_gradients=counting_walk, backward=counting_backward))
    return seen


def _grads(x, w, y, weights=None, **kwargs):
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = ak.margin_softmax_loss(xg, wg, y, backend="torch", **kwargs)
    (loss if weights is None else (loss * weights).sum()).backward()
    return loss.detach(), xg.grad, wg.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction,smoothing,per_row", [("mean", 0.0, False), ("sum", 0.1, True)])
def test_gradients_made_in_forward_match_the_float64_oracle(walk_spy, dtype, reduction, smoothing, per_row):
    """float32: the walk, in 3 blocks of rows and 6 chunks of classes; float64: the class walk."""
    x, w, y = make_problem(N, C, D, dtype=dtype, seed=3, ignore=(0, 77))
    x[5] = 0.0                     # a zero row: cos 0, no normalization gradient
    w[11] *= 2.0**100 if dtype == torch.float32 else 2.0**600  # a huge class row: seen scaled
    g = torch.Generator().manual_seed(4)
    m2 = torch.rand(N, generator=g, dtype=dtype) * 0.6 if per_row else 0.5
    spec = dict(scale=30.0, m2=m2, m3=0.05, label_smoothing=smoothing, reduction=reduction)
    with ak.workspace_budget(_budget_for_rows(64, N, C, D, 4)):
        assert row_blocks.block_rows(N, C, D) == 50  # 64 fit: 3 blocks of 50, 6 chunks of classes each
        out = _grads(x, w, y, **spec)
    walked = dtype == torch.float32
    assert walk_spy == {"walks": int(walked), "backward": int(not walked)}
    ref = oracle(x, w, y, k=1, eps=smoothing, **{k: v for k, v in spec.items() if k != "label_smoothing"})
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        assert o.dtype == dtype
        assert rel_err(o, r) <= TOL[dtype], name


def test_an_upstream_gradient_that_differs_between_rows_runs_the_backward(walk_spy):
    x, w, y = make_problem(N, C, D, seed=5, ignore=(3,))
    weights = torch.linspace(0.5, 1.5, N)
    with ak.workspace_budget(_budget_for_rows(64, N, C, D, 4)):
        out = _grads(x, w, y, weights, reduction="none")
    assert walk_spy == {"walks": 1, "backward": 1}
    ref = oracle(x, w, y, reduction="none", row_weights=weights)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= TOL[torch.float32]


def test_a_second_backward_recomputes(walk_spy):
    x, w, y = make_problem(N, C, D, seed=6)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with ak.workspace_budget(_budget_for_rows(64, N, C, D, 4)):
        loss = ak.margin_softmax_loss(xg, wg, y, backend="torch")
        loss.backward(retain_graph=True)
        first = xg.grad.clone(), wg.grad.clone()
        loss.backward()
    assert walk_spy == {"walks": 1, "backward": 1}
    assert rel_err(xg.grad, 2 * first[0]) <= 1e-5 and rel_err(wg.grad, 2 * first[1]) <= 1e-5


def _edge_problem(n, c, d, seed, nan_row):
    """Rows at their target's cosine exactly 1 and -1 (norms powers of two: both walks round
    nothing there, where phi's slope is steep), a row without a target, a row and (c > 5) a class
    row of norm below eps and, with
    nan_row, a NaN row (it makes every dW entry NaN) among random ones; with c = 1, no row has a
    non-target class (its max -inf, its sum 0)."""
    x, w, y = make_problem(n, c, d, seed=seed, ignore=(2,))
    y[0], y[1] = 0, c - 1
    w[0] = w[c - 1] = 0.0
    w[0, 0] = w[c - 1, 0] = 0.5
    x[0], x[1], x[3] = 0.0, 0.0, 0.0
    x[0, 0], x[1, 0] = 2.0, -4.0
    x[3, 1] = 2.0**-41  # below eps (1e-12): its norm clamped, its dX row not projected
    if c > 5:
        w[5] = 0.0
        w[5, 0] = 2.0**-41  # the same for a class row and its dW row
    if nan_row:
        x[4, 1] = float("nan")
    return x, w, torch.where(y == -100, -1, y)


@pytest.mark.parametrize("n_classes", [37, 1])
@pytest.mark.parametrize("settings", [
    dict(), dict(m1=1.35, m2=0.0), dict(m3=0.2, easy_margin=True), dict(m2=-0.3, fallback="clip"),
    dict(m2="per_row", margin_grad="straight_through"), dict(label_smoothing=0.1), dict(m1=4.0, m2=0.0, m3=0.1)])
def test_the_walk_matches_the_class_walk_in_torch_ops(monkeypatch, settings, n_classes):
    """The walk op (float32, 2 blocks of rows, 4 chunks of classes) against the class walk on torch
    ops alone (op.forward_stats, then op.backward_core for a unit upstream gradient): every
    statistic, the loss, lse and gap to float32 rounding in logit units, dX and dW to that of their
    largest entry;
    NaN exactly where the class walk has it."""
    n, d = 100, 8
    if settings.get("m2") == "per_row":
        settings = {**settings, "m2": torch.linspace(0.0, 0.6, n)}
    options = LossOptions(scale=64.0, **settings).for_rows(n, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(common, "CPU_TILE_BYTES", 10 * 64 * 4)
    for nan_row in (False, True):
        x, w, labels = _edge_problem(n, n_classes, d, seed=len(str(settings)), nan_row=nan_row)
        active = labels >= 0
        with ak.workspace_budget(_budget_for_rows(64, n, n_classes, d, 4)):
            assert row_blocks.block_rows(n, n_classes, d) == 50  # 64 fit: 2 blocks of 50
            fused, unit = op.forward_with_gradients(x, w, labels, active, options, "torch", n_classes, True, True,
                                                    torch.float32)
        with monkeypatch.context() as torch_ops_only:
            torch_ops_only.setattr(chunked, "_CPU_OPS", None)
            ref = op.forward_stats(x, w, labels, active, options, "torch", n_classes)
            dx, dw = op.backward_core(active.float(), x, w, labels, ref.saved, options, "torch", n_classes,
                                      torch.float32)
        for name, a, b in zip(ref.stats._fields + ("loss", "lse", "gap"),
                              (*fused.stats, fused.loss, fused.saved.lse, fused.saved.gap),
                              (*ref.stats, ref.loss, ref.saved.lse, ref.saved.gap), strict=True):
            # atol: a few float32 ulps of a logit of size s = 64 (phi is C++'s formula there, torch's here)
            torch.testing.assert_close(a, b, rtol=2e-5, atol=64 * 2**-20, equal_nan=True,
                                       msg=f"{name}, NaN row {nan_row}")
        for name, a, b in (("dX", unit.dx, dx), ("dW", unit.dw, dw)):
            largest = float(b.nan_to_num(0.0).abs().max())
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * largest, equal_nan=True,
                                       msg=f"{name}, NaN row {nan_row}")


def _gemm_flops(events):
    """2 m k n per matrix product (mm, addmm, in place or not, out= included) among the profiled
    ATen calls, those inside the extension's ops included; a product inside another is counted once."""
    names = ("aten::mm", "aten::addmm", "aten::addmm_")
    flops = 0
    for e in events:
        if e.name in names and not (e.cpu_parent is not None and e.cpu_parent.name in names):
            a, b = e.input_shapes[:2] if e.name == "aten::mm" else e.input_shapes[1:3]
            flops += 2 * a[0] * a[1] * b[1]
    return flops


@pytest.mark.parametrize("requires", ["both", "x", "w"])
def test_forward_and_backward_take_three_gemms_of_2ncd(requires):
    x, w, y = make_problem(N, C, D, seed=7)
    x.requires_grad_(requires in ("both", "x"))
    w.requires_grad_(requires in ("both", "w"))
    unit = 2 * N * C * D
    with ak.workspace_budget(_budget_for_rows(64, N, C, D, 4)), profile(record_shapes=True) as prof:
        ak.margin_softmax_loss(x, w, y, backend="torch").backward()
    gemms = 3 if requires == "both" else 2  # Z per block once; P W and P^T X only where asked
    assert _gemm_flops(prof.events()) == gemms * unit


def test_peak_memory_stays_within_the_budget():
    n, c, d = 512, 2048, 16   # one float32 N x C matrix: 4 MiB, four times the budget
    budget = 2**20
    x, w, y = make_problem(n, c, d, seed=8, ignore=(3,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    with ak.workspace_budget(budget):
        assert 64 <= row_blocks.block_rows(n, c, d) < n
        with LiveBytes() as probe:
            ak.margin_softmax_loss(x, w, y, label_smoothing=0.1, backend="torch").backward()
    gradients = x.numel() * 8 + w.numel() * 4  # dX (float32, and its copy scaled) and dW
    statistics = 8 * 4 * (n + c)
    assert probe.peak <= budget + gradients + statistics, (probe.peak, budget, gradients)


@pytest.mark.parametrize("n", [64, 65, 150, 1024, 1025])
def test_blocks_are_as_even_as_the_fewest_blocks_allow(n):
    c, d = 1000, 16
    for fit in (64, 100, 164):
        with ak.workspace_budget(_budget_for_rows(fit, n, c, d, 4)):
            rows = row_blocks.block_rows(n, c, d)
        fewest = -(-n // min(fit, n))
        assert rows <= fit and -(-n // rows) == fewest  # within the budget, no more blocks
        assert n - (fewest - 1) * rows >= rows - fewest  # the last block short by < one row a block


def test_no_block_below_the_minimum_rows():
    # at C = 10^6 a 64 MiB budget holds 16 rows of float32 tiles: the class walk runs
    assert row_blocks.block_rows(256, 10**6, 128) == 0
    assert row_blocks.block_rows(256, 100_000, 512) >= row_blocks.MIN_BLOCK_ROWS
    assert row_blocks.block_rows(10, 10**6, 128) == 10


def test_no_gradients_are_made_without_grad_mode(walk_spy):
    x, w, y = make_problem(N, C, D, seed=9)
    x.requires_grad_(True)
    w.requires_grad_(True)
    with torch.no_grad():
        with_no_grad = ak.margin_softmax_loss(x, w, y, backend="torch")
    assert walk_spy == {"walks": 0, "backward": 0}
    assert torch.equal(with_no_grad, ak.margin_softmax_loss(x.detach(), w.detach(), y, backend="torch"))


def test_same_inputs_same_bits(walk_spy):
    x, w, y = make_problem(N, C, D, seed=10, ignore=(4,))
    with ak.workspace_budget(_budget_for_rows(64, N, C, D, 4)):
        first, second = _grads(x, w, y, label_smoothing=0.1), _grads(x, w, y, label_smoothing=0.1)
    assert walk_spy["walks"] == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_same_bits_on_one_and_two_threads(walk_spy, monkeypatch):
    """The walk's row kernels split rows over threads (one chunk of 1,000 classes: 32 rows per
    task, at::internal::GRAIN_SIZE / 1,000), each row reduced by one thread in a fixed order: the
    thread count changes no bit."""
    monkeypatch.setattr(common, "CPU_TILE_BYTES", 16 * 2**20)  # walk_spy's narrow chunks would not split
    x, w, y = make_problem(150, 1000, 8, seed=11, ignore=(4,))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_grads(x, w, y, label_smoothing=0.1))
    finally:
        torch.set_num_threads(threads)
    assert walk_spy["walks"] == 2
    assert all(torch.equal(a, b) for a, b in zip(*results))
