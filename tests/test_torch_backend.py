"""What only the `torch` backend has: the workspace budget, float64 (gradcheck), CPU autocast."""

import pytest
import torch

import arcface_kernels as ak
from helpers import loss_and_grads, make_problem, rel_err


def test_chunking_does_not_change_the_result_beyond_rounding():
    x, w, y = make_problem(16, 300, 24, seed=8)
    small = loss_and_grads(x, w, y, backend="torch")
    with ak.workspace_budget(64 * 2**20):
        whole = loss_and_grads(x, w, y, backend="torch")
    for u, v in zip(small, whole):
        assert rel_err(u, v) < 1e-6


def test_gradcheck_float64():
    x, w, y = make_problem(4, 6, 5, k=2, dtype=torch.float64, seed=9, ignore=(1,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    m3 = torch.tensor([0.1, 0.0, 0.2, 0.05], dtype=torch.float64)

    def f(x, w):
        return ak.margin_softmax_loss(x, w, y, scale=4.0, m1=1.2, m2=0.3, m3=m3, sub_centers=2,
                                      label_smoothing=0.1, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_both_inputs(dtype):
    x, w, y = make_problem(5, 9, 6, seed=11)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = ak.margin_softmax_loss(x, w, y, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = ak.margin_softmax_loss(x.to(dtype), w.detach().to(dtype), y, backend="torch")
    assert torch.equal(loss.detach(), ref)


def test_float64_end_to_end_margins_included():
    # Margins that float32 cannot hold (0.3, 1.35, per-row tensors) stay float64: 1e-13, not 1e-8.
    from float64_oracle import oracle

    x, w, y = make_problem(7, 13, 6, k=2, dtype=torch.float64, seed=12, ignore=(2,))
    m3 = torch.linspace(0.01, 0.2, 7, dtype=torch.float64)
    loss, dx, dw = loss_and_grads(x, w, y, backend="torch", scale=30.0, m1=1.35, m2=0.3, m3=m3, sub_centers=2)
    want = oracle(x, w, y, scale=30.0, m1=1.35, m2=0.3, m3=m3, k=2)
    for got, ref in zip((loss, dx, dw), want):
        assert got.dtype == torch.float64
        assert rel_err(got, ref) < 1e-12


def test_one_pass_norms_give_the_bits_of_the_overflow_safe_path():
    # common._plain_norms (one 2-norm pass) where no row is near overflow or underflow; the
    # careful path (infinity norm, rows scaled by a power of two) elsewhere: the same bits.
    from arcface_kernels.backends import common

    g = torch.Generator().manual_seed(3)
    v = torch.randn(300, 37, generator=g) * torch.logspace(-8, 8, 300)[:, None]
    v[5] = 0.0
    careful = common._inverse(*reversed(common._exponents_and_unit_norms(v, torch.float32)), torch.float32)
    assert common._plain_norms(v, torch.float32) is not None
    assert torch.equal(common.inverse_norms(v, torch.float32), careful)
    for extreme in (2.0**60, 2.0**-70):  # near overflow of the squares, below the plain path's floor
        w = v.clone()
        w[7] = extreme * v[7] / v[7].norm()
        assert common._plain_norms(w, torch.float32) is None
        want = common._inverse(*reversed(common._exponents_and_unit_norms(w, torch.float32)), torch.float32)
        assert torch.equal(common.inverse_norms(w, torch.float32), want)


def test_options_are_validated_once_per_settings(monkeypatch):
    # for_rows and the op's unflatten (forward and backward) rebuild validated settings unchecked;
    # the functional API validates each distinct set of plain settings once, a head at construction.
    from arcface_kernels import api, validation

    calls = []
    check = validation.check_options
    monkeypatch.setattr(validation, "check_options", lambda options: calls.append(1) or check(options))
    api._plain_options.cache_clear()
    x, w, y = make_problem(6, 11, 5, seed=4)
    w.requires_grad_(True)
    for _ in range(3):
        ak.margin_softmax_loss(x, w, y, label_smoothing=0.1, backend="torch").backward()
    assert len(calls) == 1
    ak.margin_softmax_loss(x, w, y, label_smoothing=0.2, backend="torch").backward()
    assert len(calls) == 2
    # a tensor setting is read on every call (its value may have changed in place)
    m2 = torch.full((6,), 0.5)
    for _ in range(2):
        ak.margin_softmax_loss(x, w, y, m2=m2, backend="torch")
    assert len(calls) == 4
    head = ak.ArcFaceLoss(11, 5, backend="torch")
    for _ in range(2):
        head(x, y).backward()
    assert len(calls) == 5
    # a wrong type is refused on every call, never served from the cache (True == 1, 1 == 1.0)
    for _ in range(2):
        with pytest.raises(TypeError, match="sub_centers"):
            ak.margin_softmax_loss(x, w, y, sub_centers=1.0, backend="torch")
    with pytest.raises(TypeError, match="easy_margin"):
        ak.margin_softmax_loss(x, w, y, easy_margin=1, backend="torch")


def test_eager_forward_is_the_custom_op_bit_for_bit():
    # op._EagerForward (eager CPU calls) runs the op's implementation and backward op without the
    # custom op's dispatch layers: the same outputs a caller reads (the first four) and gradients,
    # bit for bit.
    from arcface_kernels import op

    x, w, y = make_problem(9, 13, 6, seed=7)
    y[2] = -100
    options = ak.LossOptions(m2=0.4, label_smoothing=0.1).for_rows(9, x.device, torch.float32)
    results = []
    for forward in (op.margin_softmax_fwd, op._EagerForward.apply):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = forward(xg, wg, y, options.m1, options.m2, options.m3, options.flatten(), "torch", torch.float32)
        (out[0] * torch.linspace(0.5, 2.0, 9)).sum().backward()
        assert not any(t.requires_grad for t in out[1:])
        results.append([*out[:4], xg.grad, wg.grad])
    assert len(results[1]) == 6  # the eager Function returns the four outputs a caller reads
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
