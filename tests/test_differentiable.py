"""What is differentiable (README, "What is differentiable, and autocast"): the loss in reverse
mode; the return_stats outputs and the margins carry no gradient and say so; torch.func
transforms and forward-mode AD are refused with an error naming the limitation."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import arcface_kernels as ak
from helpers import make_problem


def _problem():
    x, w, y = make_problem(5, 7, 6, seed=3)
    return x.requires_grad_(True), w.requires_grad_(True), y


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("stat", ["lse", "target_cos"])
def test_a_loss_built_on_stats_raises_instead_of_a_silent_zero_gradient(backend, stat):
    x, w, y = _problem()
    loss, stats = ak.margin_softmax_loss(x, w, y, return_stats=True, backend=backend)
    z_loss = loss + 1e-4 * getattr(stats, stat).pow(2).mean()
    with pytest.raises(RuntimeError, match="return_stats outputs .* carry no gradient"):
        z_loss.backward()
    # The loss alone still differentiates, and detached stats are plain tensors.
    loss, stats = ak.margin_softmax_loss(x, w, y, return_stats=True, backend=backend)
    (loss + stats.lse.detach().mean()).backward()
    assert x.grad.abs().sum() > 0
    assert not stats.top1.requires_grad


@pytest.mark.parametrize(
    "transform",
    [
        lambda f, x: torch.func.grad(f)(x),
        lambda f, x: torch.func.vmap(f)(x[None]),
        lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
        lambda f, x: torch.func.jacrev(f)(x),
    ],
    ids=["grad", "vmap", "jvp", "jacrev"],
)
def test_torch_func_transforms_are_refused_by_name(transform):
    x, w, y = make_problem(5, 7, 6, seed=3)
    with pytest.raises(NotImplementedError, match="does not support torch.func transforms"):
        transform(lambda a: ak.margin_softmax_loss(a, w, y, backend="torch"), x)


def test_forward_mode_ad_is_refused_by_name():
    x, w, y = make_problem(5, 7, 6, seed=3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="does not support forward-mode AD"):
            ak.margin_softmax_loss(dual, w, y, backend="torch")
        # A dual level with no dual input is no obstacle.
        assert torch.isfinite(ak.margin_softmax_loss(x, w, y, backend="torch"))



def test_double_backward_is_refused_by_name():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    loss = ak.margin_softmax_loss(x, w, torch.tensor([0, 1, 2, 3]), backend="torch")
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        grad_x.sum().backward()
