"""The workspace budget: per thread / per context, and honoured by the `torch` backend: the
peak extra memory of forward + backward stays within the budget plus the gradient outputs
(and O(N + C) statistics), measured at a shape whose N x C is far above the budget."""

import threading

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.backends import common, get_workspace_budget
from arcface_kernels.backends.common import DEFAULT_WORKSPACE_BUDGET
from bench.live_bytes import LiveBytes
from helpers import make_problem


def test_live_bytes_probe_sees_a_materialized_matrix():
    with LiveBytes() as probe:
        a = torch.ones(256, 1024)
        b = a * 2
        del a, b
        c = torch.ones(16)
    assert probe.peak == 2 * 256 * 1024 * 4
    assert probe.live == 16 * 4
    del c


def test_live_bytes_probe_sees_inside_the_fused_op(monkeypatch):
    # At a budget (and CPU tile size) that lets one chunk hold every class, the N x C tile shows.
    monkeypatch.setattr(common, "CPU_TILE_BYTES", 2**30)
    n, c = 64, 4096
    x, w, y = make_problem(n, c, 8, seed=1)
    with ak.workspace_budget(2**30), LiveBytes() as probe:
        ak.margin_softmax_loss(x, w, y, backend="torch")
    assert probe.peak >= n * c * 4


@pytest.mark.parametrize("budget_mib,k,dtype", [(1, 1, torch.float32), (2, 2, torch.float32), (1, 1, torch.bfloat16)])
def test_peak_memory_of_forward_and_backward_stays_within_the_budget(budget_mib, k, dtype):
    n, c, d = 512, 8192, 16   # one float32 N x C matrix: 16 MiB, far above the budget
    budget = budget_mib * 2**20
    x, w, y = make_problem(n, c, d, k=k, dtype=dtype, seed=1, ignore=(3,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    with ak.workspace_budget(budget), LiveBytes() as probe:
        loss = ak.margin_softmax_loss(x, w, y, sub_centers=k, label_smoothing=0.1, backend="torch")
        loss.backward()
    gradients = x.numel() * (4 + x.element_size()) + w.numel() * w.element_size()  # dX float32 and cast, dW
    statistics = 8 * 4 * (n + c * k)   # O(N + C): norms, their squares, lse, loss rows, ...
    assert probe.peak <= budget + gradients + statistics, (probe.peak, budget, gradients)
    assert probe.peak < n * c * 4


def test_budget_is_per_thread():
    seen = {}
    a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()

    def a():
        with ak.workspace_budget(1000):
            a_entered.set()
            b_entered.wait()
            seen["a inside"] = get_workspace_budget()
        seen["a after"] = get_workspace_budget()
        a_exited.set()

    def b():
        a_entered.wait()
        with ak.workspace_budget(2000):
            b_entered.set()
            a_exited.wait()   # a leaves first: a process global would now be wrong for b
            seen["b inside"] = get_workspace_budget()
        seen["b after"] = get_workspace_budget()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a inside": 1000, "a after": DEFAULT_WORKSPACE_BUDGET,
                    "b inside": 2000, "b after": DEFAULT_WORKSPACE_BUDGET}
    assert get_workspace_budget() == DEFAULT_WORKSPACE_BUDGET


def test_nested_budgets_restore_in_order_and_bad_budgets_are_refused():
    with ak.workspace_budget(3000):
        with ak.workspace_budget(4000):
            assert get_workspace_budget() == 4000
        assert get_workspace_budget() == 3000
    assert get_workspace_budget() == DEFAULT_WORKSPACE_BUDGET
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workspace budget must be a positive number of bytes"):
            with ak.workspace_budget(bad):
                pass


def test_results_depend_on_the_budget_only_through_rounding():
    # Chunk boundaries change the order of the online sums: close, not bit-for-bit.
    x, w, y = make_problem(8, 500, 16, seed=2)
    losses = []
    for budget in (4096, 2**20):
        with ak.workspace_budget(budget):
            losses.append(ak.margin_softmax_loss(x.double(), w.double(), y, backend="torch"))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-13, atol=0)
