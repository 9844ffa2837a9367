"""Proof that the fused backends never build an N x C tensor, forward or backward."""

import pytest

import arcface_kernels as ak
from alloc_probe import LargestAllocation
from helpers import make_problem


def test_probe_sees_the_reference_logits():
    # The probe must be able to fail: the materializing reference builds N x C.
    n, c, d = 32, 2000, 8
    x, w, y = make_problem(n, c, d)
    x.requires_grad_(True)
    with LargestAllocation() as probe:
        ak.margin_softmax_loss(x, w, y, backend="reference").backward()
    assert probe.largest >= n * c


def test_probe_sees_inside_the_fused_op(backend, device):
    # With a budget that lets one chunk hold every class, the fused backends' N x C tiles show:
    # the probe sees what the op's implementation allocates, not only its outputs.
    n, c, d = 32, 2048, 8  # C a multiple of every class tile, so one chunk holds all classes
    x, w, y = make_problem(n, c, d, seed=2, device=device)
    x.requires_grad_(True)
    with ak.workspace_budget(2**30), LargestAllocation() as probe:
        ak.margin_softmax_loss(x, w, y, backend=backend).backward()
    assert probe.largest >= n * c, (probe.largest, probe.largest_op)


# Smaller for the triton backend, which runs in the (slow) interpreter on a CPU.
SHAPES = {"torch": (64, 20000, 16), "triton": (32, 3000, 8), "cuda": (64, 20000, 16)}


@pytest.mark.parametrize("k", [1, 2])
def test_fused_backend_never_allocates_n_by_c(backend, device, k):
    n, c, d = SHAPES[backend]
    x, w, y = make_problem(n, c, d, k=k, seed=1, ignore=(3,), device=device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    budget = 256 * 1024  # bytes: far below one N x C float32 matrix (5 MB)
    with ak.workspace_budget(budget), LargestAllocation() as probe:
        loss, stats = ak.margin_softmax_loss(x, w, y, sub_centers=k, label_smoothing=0.1,
                                             return_stats=True, backend=backend)
        loss.backward()
    # The largest tensors are the weight-sized ones (its gradient) or the bounded workspace.
    assert probe.largest < n * c, probe.largest_op
    assert probe.largest <= max(c * k * d, budget // 4), (probe.largest, probe.largest_op)
