"""The self-check can fail: run on the CPU through the `torch` backend with a deliberately broken
copy of it in the registry, it catches a straight-through dphi/dc and a dropped class split,
two bugs the previous self-check (N = 37, C = 301 random rows) let pass at its bf16 bound 5e-2.
The broken copies have no forward with gradients (backends/row_blocks.py), so that the self-check
runs the broken forward and backward; a broken forward with gradients is caught too."""

import dataclasses

import pytest
import torch

from arcface_kernels import selfcheck
from arcface_kernels.backends import RowNorms, registry
from arcface_kernels.margins import dphi_dcos

TORCH = registry.get_backend("torch")
SPLIT = 4096  # classes per forward split of the broken backend


def _target_cos(x, w, labels, options, norms):
    """cos of each row to its target class (the winning sub-centre), in the compute dtype."""
    k, d = options.sub_centers, x.shape[1]
    cls = labels.clamp_min(0)
    dots = (x[:, None, :] * w.view(-1, k, d)[cls]).sum(-1) * norms.rw.view(-1, k)[cls]
    return dots.max(1).values * norms.rx


def straight_through_backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype):
    """The bug: the target entry's gradient without the margin's slope (dphi/dc taken as 1)."""
    slope = dphi_dcos(_target_cos(x, w, labels, options, norms), options.m1, options.m2, options.m3,
                      options.easy_margin, options.straight_through)
    target_dcos = torch.where(labels >= 0, target_dcos / slope, target_dcos)
    return TORCH.backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype)


def dropped_split_forward(x, w, labels, options, norms):
    """The bug: the forward's statistics leave out every class split but the first."""
    keep = SPLIT * options.sub_centers
    if w.shape[0] <= keep:
        return TORCH.forward(x, w, labels, options, norms)
    kept = torch.where(labels < SPLIT, labels, -1)
    return TORCH.forward(x, w[:keep], kept, options, RowNorms(norms.rx, norms.rw[:keep]))


BUGS = {
    "straight-through dphi/dc": dict(backward=straight_through_backward, forward_with_gradients=None),
    "dropped class split": dict(forward=dropped_split_forward, forward_with_gradients=None),
}


def previous_check_errors():
    """The previous self-check (info.self_check before this change), on the torch backend."""
    from arcface_kernels import margin_softmax_loss

    g = torch.Generator().manual_seed(0)
    n, c, d, k = 37, 301, 24, 2
    x, w = torch.randn(n, d, generator=g), torch.randn(c * k, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    y[5] = -100
    options = dict(sub_centers=k, label_smoothing=0.1, m1=1.05, m2=0.3, m3=0.1)
    results = []
    for name, xx, ww in (("torch", x, w), ("reference", x.double(), w.double())):
        xx, ww = xx.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        loss = margin_softmax_loss(xx, ww, y, backend=name, **options)
        loss.backward()
        results.append([t.detach().double() for t in (loss, xx.grad, ww.grad)])
    return [float((a - b).norm() / b.norm()) for a, b in zip(*results)]


def test_the_torch_backend_passes():
    passed, errors = selfcheck.check("torch", "cpu", torch.float32)
    assert passed, errors


@pytest.mark.parametrize("bug", BUGS)
def test_catches_the_bug_the_previous_check_let_pass(bug, monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "torch", dataclasses.replace(TORCH, **BUGS[bug]))
    assert max(previous_check_errors()) < 5e-2  # the previous bound for bf16
    passed, errors = selfcheck.check("torch", "cpu", torch.float32)
    assert not passed, errors
    # caught even at the loosest (bf16) tolerance, not only by fp32's 1e-4
    assert max(errors.values()) > selfcheck.TOLERANCE[torch.bfloat16], errors


def test_rows_lie_near_their_class_centre():
    x, w, y = selfcheck.problem(dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(x, w[y], dim=1)
    assert cos.min() >= selfcheck.TARGET_COS[0] - 1e-12 and cos.max() <= selfcheck.TARGET_COS[1] + 1e-12


def _dx_off_by_one_percent_in_backward(*args):
    dx, dw = TORCH.backward(*args)
    return dx * 1.01, dw


def _dx_off_by_one_percent_in_forward(*args):
    stats, loss, lse, gap, dx, dw = TORCH.forward_with_gradients(*args)
    return stats, loss, lse, gap, dx * 1.01, dw


@pytest.mark.parametrize("broken", [
    dict(backward=_dx_off_by_one_percent_in_backward, forward_with_gradients=None),
    dict(forward_with_gradients=_dx_off_by_one_percent_in_forward),
], ids=["backward", "forward with gradients"])
def test_catches_a_one_percent_error_in_dx(broken, monkeypatch):
    monkeypatch.setitem(registry._BACKENDS, "torch", dataclasses.replace(TORCH, **broken))
    errors = selfcheck.errors("torch", "cpu", torch.float32)
    assert errors["dX"] > 5e-3 and errors["loss"] < 1e-6 and errors["dW"] < 1e-4
