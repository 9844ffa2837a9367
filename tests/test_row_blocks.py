"""The `torch` backend's forward with gradients on a CPU (backends/row_blocks.py): the gradients of
a "mean" or "sum" loss made in forward from tiles kept per block of rows, 3 GEMMs of 2NCD flops in
all. Checked against the independent float64 oracle over several row blocks and class chunks,
with the walk and the fallbacks (the backward op) observed, and its memory within the budget."""

import dataclasses

import pytest
import torch
from float64_oracle import oracle
from torch.utils._python_dispatch import TorchDispatchMode

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
    x, w, y = make_problem(N, C, D, dtype=dtype, seed=3, ignore=(0, 77))
    x[5] = 0.0                     # a zero row: cos 0, no normalization gradient
    w[11] *= 2.0**100 if dtype == torch.float32 else 2.0**600  # a huge class row: seen scaled
    g = torch.Generator().manual_seed(4)
    m2 = torch.rand(N, generator=g, dtype=dtype) * 0.6 if per_row else 0.5
    spec = dict(scale=30.0, m2=m2, m3=0.05, label_smoothing=smoothing, reduction=reduction)
    with ak.workspace_budget(_budget_for_rows(64, N, C, D, x.element_size())):
        assert row_blocks.block_rows(N, C, D, dtype) == 64  # 3 blocks, 6 chunks of classes each
        out = _grads(x, w, y, **spec)
    assert walk_spy == {"walks": 1, "backward": 0}
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


def _running_rows(n, seed):
    """A walk's running row statistics (op.finish_rows' input) at scale 64 with the edge rows: a
    target at cos 1 and at cos -1, a row with no non-target class (max -inf, sum 0), no target,
    a NaN logit."""
    g = torch.Generator().manual_seed(seed)
    nt_max = torch.randn(n, generator=g) * 20
    nt_sum = torch.rand(n, generator=g) * 50 + 1
    target_z = (torch.rand(n, generator=g) * 2 - 1) * 64
    best_z = torch.maximum(nt_max, target_z)
    labels = torch.randint(0, 100, (n,), generator=g)
    target_z[:2] = torch.tensor([64.0, -64.0])
    nt_max[2], nt_sum[2] = -float("inf"), 0.0
    labels[3] = -1
    target_z[4] = float("nan")
    nt_logit_sum = torch.randn(n, generator=g) * 100
    return (nt_max, nt_sum, best_z, torch.arange(n), target_z, nt_logit_sum), labels


@pytest.mark.parametrize("settings", [
    dict(), dict(m1=1.35, m2=0.0), dict(m3=0.2, easy_margin=True), dict(m2=-0.3, fallback="clip"),
    dict(m2="per_row", margin_grad="straight_through"), dict(label_smoothing=0.1), dict(m1=4.0, m2=0.0, m3=0.1)])
def test_fused_row_finish_matches_torch_ops(monkeypatch, settings):
    """op.finish_rows' one op of the CPU extension (float32) against its torch ops: every
    statistic, the loss, lse, gap and the target gradient factor, to float32 rounding."""
    n = 48
    running, labels = _running_rows(n, seed=len(str(settings)))
    if settings.get("m2") == "per_row":
        settings = {**settings, "m2": torch.linspace(0.0, 0.6, n)}
    if not settings.get("label_smoothing"):
        running = running[:5] + (None,)
    options = LossOptions(scale=64.0, **settings).for_rows(n, torch.device("cpu"), torch.float32)
    active = labels >= 0
    fused = op.finish_rows(running, labels, active, options, 100)
    monkeypatch.setattr(chunked, "_CPU_OPS", None)
    ref = op.finish_rows(running, labels, active, options, 100)
    names = ref[0]._fields + ("loss", "lse", "gap", "factor")
    for name, a, b in zip(names, (*fused[0], *fused[1:]), (*ref[0], *ref[1:]), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5, equal_nan=True, msg=name)


class GemmFlops(TorchDispatchMode):
    """2 m k n per matrix product dispatched (mm, addmm, in place or not); a custom op's insides
    are not seen (the backward op), the autograd.Function's forward is."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args[:2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("requires", ["both", "x", "w"])
def test_forward_and_backward_take_three_gemms_of_2ncd(requires):
    x, w, y = make_problem(N, C, D, seed=7)
    x.requires_grad_(requires in ("both", "x"))
    w.requires_grad_(requires in ("both", "w"))
    unit = 2 * N * C * D
    with GemmFlops() as counted:
        ak.margin_softmax_loss(x, w, y, backend="torch").backward()
    gemms = 3 if requires == "both" else 2  # Z per block once; P W and P^T X only where asked
    assert counted.flops == gemms * unit


def test_peak_memory_stays_within_the_budget():
    n, c, d = 512, 2048, 16   # one float32 N x C matrix: 4 MiB, four times the budget
    budget = 2**20
    x, w, y = make_problem(n, c, d, seed=8, ignore=(3,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    with ak.workspace_budget(budget):
        assert 64 <= row_blocks.block_rows(n, c, d, torch.float32) < n
        with LiveBytes() as probe:
            ak.margin_softmax_loss(x, w, y, label_smoothing=0.1, backend="torch").backward()
    gradients = x.numel() * 8 + w.numel() * 4  # dX (float32, and its copy scaled) and dW
    statistics = 8 * 4 * (n + c)
    assert probe.peak <= budget + gradients + statistics, (probe.peak, budget, gradients)


def test_no_block_below_the_minimum_rows():
    # at C = 10^6 a 64 MiB budget holds 16 rows of float32 tiles: the class walk runs
    assert row_blocks.block_rows(256, 10**6, 128, torch.float32) == 0
    assert row_blocks.block_rows(256, 100_000, 512, torch.float32) >= row_blocks.MIN_BLOCK_ROWS
    assert row_blocks.block_rows(10, 10**6, 128, torch.float32) == 10


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
