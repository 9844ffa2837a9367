"""Counted work of the triton backend: every tensor-core product it executes, forward plus
backward, in units of 2NCD (docs/design.md section 6: the floor of a head that never stores
N x C is 4: forward, recompute, dX, dW). Runs under TRITON_INTERPRET=1 only (the child pytest
of test_triton_interpreter.py), where each program's tl.dot is an interpreter call we can count."""

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

import arcface_kernels as ak
from arcface_kernels.backends import get_backend, row_norms

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts tl.dot under the interpreter")

_MATMULS = {torch.mm, torch.matmul, torch.addmm, torch.Tensor.mm, torch.Tensor.matmul, torch.Tensor.__matmul__,
            torch.Tensor.addmm, torch.Tensor.addmm_}
_ACCUMULATING = {torch.addmm, torch.Tensor.addmm, torch.Tensor.addmm_}


class MatmulFlops(TorchFunctionMode):
    """2 * m * k * n of every 2-D torch matmul (a function mode stays active inside the op's
    Python implementation, where a dispatch mode would not see the backend's calls)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            a, b = args[1:3] if func in _ACCUMULATING else args[:2]
            assert a.dim() == 2 and b.dim() == 2, "only 2-D products are expected"
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.fixture
def dot_flops(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    counted = {"flops": 0}
    original = InterpreterBuilder.create_dot

    def counting_dot(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        counted["flops"] += 2 * m * k * b.data.shape[-1]
        return original(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting_dot)
    return counted


@pytest.mark.parametrize("sub_centers", [1, 2])
def test_triton_forward_and_backward_do_four_units_of_2ncd(dot_flops, sub_centers):
    # tile-aligned for the interpreter's 16 x 16 x 16 tiles; several tiles, splits and chunks.
    # The backend is called directly: inside the custom op torch's function modes are off, and
    # the op itself runs no product.
    n, c, d = 32, 64, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(c * sub_centers, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    options = ak.LossOptions(sub_centers=sub_centers).for_rows(n, x.device, torch.float32)
    norms = row_norms(x, w)
    triton_backend = get_backend("triton")
    with ak.workspace_budget(16 * 1024), MatmulFlops() as matmuls:
        stats = triton_backend.forward(x, w, labels, options, norms)
        lse = stats.row_max + stats.sum_exp.log()
        triton_backend.backward(torch.ones(n), x, w, labels, lse, torch.zeros(n), options, c, norms, w.dtype)
    unit = 2 * n * c * sub_centers * d
    units = (dot_flops["flops"] + matmuls.flops) / unit
    print(f"K={sub_centers}: tl.dot {dot_flops['flops'] / unit:.2f} + torch matmuls {matmuls.flops / unit:.2f} "
          f"= {units:.2f} x 2NCD")
    assert dot_flops["flops"] == 2 * unit and matmuls.flops == 2 * unit  # forward + recompute; dX + dW
    assert units <= 4.5
