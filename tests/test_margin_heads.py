"""AdaFaceLoss, ElasticFaceLoss and MagFaceLoss (issue 18) against the float64 transcriptions of the
authors' heads (tests/authors_heads.py): loss, both gradients and AdaFace's running buffers over
three training steps, on every backend (triton under the interpreter: test_triton_interpreter.py),
with rows near theta = 0 and past pi - m and norms on both sides of MagFace's [l_a, u_a]."""

import math

import pytest
import torch
import torch.nn.functional as F
from authors_heads import AdaFaceState, adaface, elasticface, magface

import arcface_kernels as ak
from helpers import TOL, rel_err

N, C, D = 12, 9, 16


def _rows(w, y, norms, thetas, seed):
    """Rows at angle thetas[i] from their class centre (nan: a random direction), of norm norms[i]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    unit = F.normalize(w[y], dim=1)
    side = F.normalize(x - (x * unit).sum(1, keepdim=True) * unit, dim=1)
    placed = torch.cos(thetas)[:, None] * unit + torch.sin(thetas)[:, None] * side
    x = torch.where(torch.isnan(thetas)[:, None], F.normalize(x, dim=1), placed)
    return x * norms[:, None]


def _problem(seed, norms, thetas):
    """One weight for every seed (a head's steps), this seed's labels and rows."""
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(200 + seed))
    return _rows(w, y, torch.tensor(norms, dtype=torch.float64), torch.tensor(thetas, dtype=torch.float64), seed), w, y


def _ours(head, x, dtype, y, backend):
    head.weight.grad = None
    xq = x.to(dtype).requires_grad_(True)
    loss = head(xq, y, backend=backend)
    loss.backward()
    return loss.detach(), xq.grad, head.weight.grad


def _theirs(fn, x, w, y, *args, **kwargs):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fn(x, w, y, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _assert_close(ours, theirs, tol, what):
    for name, a, b in zip(("loss", "dX", "dW"), ours, theirs):
        assert rel_err(a, b) <= tol, (what, name, rel_err(a, b))


def _head(cls, dtype, w, **settings):
    head = cls(C, D, dtype=dtype, **settings)
    with torch.no_grad():
        head.weight.copy_(w.to(dtype))
    return head


def _fused_dtypes(backend, dtype):
    if dtype == torch.float16 and backend in ("reference", "torch"):
        pytest.skip("float16 operands: checked on the kernel backends")


# AdaFace's steps: norms from 1 (z < 0: g_ang > 0 pushes a row at pi - 0.1 past pi - eps, clipped)
# to 80 (z = 1: g_ang = -0.4 takes a row at theta = 0.1 below eps, clipped), random rows between.
ADA_NORMS = [1.0, 1.5, 80.0, 70.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0]
ADA_THETAS = [math.pi - 0.1, math.pi - 0.08, 0.1, 0.12] + [math.nan] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaface_matches_the_authors_over_three_steps_and_in_eval(any_backend, dtype):
    _fused_dtypes(any_backend, dtype)
    _, w, _ = _problem(0, ADA_NORMS, ADA_THETAS)
    head = _head(ak.AdaFaceLoss, dtype, w)
    state = AdaFaceState()
    # a narrower running std than the initial 100 (in both): the margins reach both clip bounds
    head.batch_std.fill_(10.0)
    state.batch_std = torch.tensor(10.0, dtype=torch.float64)
    wq = w.to(dtype).double()  # the authors' head on the very weights the fused head holds
    for step in range(4):
        head.train(step < 3)
        x, _, y = _problem(step, ADA_NORMS, ADA_THETAS)
        x = x.to(dtype).double()
        ours = _ours(head, x, dtype, y, any_backend)
        theirs = _theirs(adaface, x, wq, y, state, training=step < 3)
        # the authors clamp every cosine to 1 - eps: the problem stays inside, where the rules agree
        cos = F.normalize(x, dim=1) @ F.normalize(wq, dim=1).T
        assert cos.abs().max() < 1 - 1e-3
        _assert_close(ours, theirs, TOL[dtype], (any_backend, step))
        for buffer, value in ((head.batch_mean, state.batch_mean), (head.batch_std, state.batch_std)):
            assert abs(float(buffer) - float(value)) <= 1e-6 * float(value), (step, float(buffer), float(value))
    # the clip held some target angles at both bounds on the last steps' margins
    z = ((x.norm(dim=1).clamp(0.001, 100) - state.batch_mean) / (state.batch_std + 1e-3) * 0.333).clamp(-1, 1)
    angle = torch.acos((F.normalize(x, dim=1) * F.normalize(wq[y], dim=1)).sum(1)) - 0.4 * z
    assert (angle < 1e-3).any() and (angle > math.pi - 1e-3).any()


def test_adaface_buffers_are_unchanged_in_eval_and_in_state_dict():
    x, w, y = _problem(0, ADA_NORMS, ADA_THETAS)
    head = _head(ak.AdaFaceLoss, torch.float32, w).eval()
    head(x.float(), y)
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0
    assert {"batch_mean", "batch_std", "weight"} == set(head.state_dict())
    head.train()(x.float(), y)
    assert float(head.batch_mean) != 20.0


# MagFace: norms below l_a = 10, inside, above u_a = 110; rows near theta = 0 and past pi - m.
MAG_NORMS = [5.0, 8.0, 12.0, 30.0, 55.0, 90.0, 109.0, 150.0, 200.0, 40.0, 70.0, 3.0]
MAG_THETAS = [0.05, math.pi - 0.1, 0.3, math.pi - 0.2, 1.0, 2.9] + [math.nan] * 6


@pytest.mark.parametrize("easy_margin", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_magface_matches_the_authors_with_the_margin_gradient(any_backend, dtype, easy_margin):
    _fused_dtypes(any_backend, dtype)
    x, w, y = _problem(0, MAG_NORMS, MAG_THETAS)
    x, wq = x.to(dtype).double(), w.to(dtype).double()
    head = _head(ak.MagFaceLoss, dtype, w, easy_margin=easy_margin)
    ours = _ours(head, x, dtype, y, any_backend)
    theirs = _theirs(magface, x, wq, y, easy_margin=easy_margin)
    _assert_close(ours, theirs, TOL[dtype], any_backend)


def test_magface_margin_gradient_reaches_x_only_inside_the_norm_range():
    """The part of dX along x_i (radial) comes only from the norm: margin and regularizer; it is 0
    for rows clamped below l_a or above u_a, and nonzero inside."""
    x, w, y = _problem(0, MAG_NORMS, MAG_THETAS)
    head = _head(ak.MagFaceLoss, torch.float64, w)
    _, dx, _ = _ours(head, x, torch.float64, y, "torch")
    radial = (dx * F.normalize(x, dim=1)).sum(1).abs()
    norms = x.norm(dim=1)
    inside = (norms > 10) & (norms < 110)
    assert (radial[~inside] < 1e-12).all() and (radial[inside] > 1e-6).all()


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_with_zero_std_is_arcface_or_cosface(any_backend, kind):
    x, w, y = _problem(0, [1.0] * N, [math.nan] * N)
    head = _head(ak.ElasticFaceLoss, torch.float32, w, kind=kind, std=0.0)
    plain = ak.ArcFaceLoss(C, D) if kind == "arc" else ak.CosFaceLoss(C, D)
    with torch.no_grad():
        plain.weight.copy_(head.weight)
    xf = x.float()
    assert torch.equal(head(xf, y, backend=any_backend), plain(xf, y, backend=any_backend))


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_matches_the_authors_with_the_same_draws(any_backend, kind, plus):
    x, w, y = _problem(1, [1.0] * N, [0.05, 0.3, 1.0] + [math.nan] * 9)
    head = _head(ak.ElasticFaceLoss, torch.float32, w, kind=kind, std=0.05, plus=plus)
    xf = x.float()
    torch.manual_seed(7)
    ours = _ours(head, xf.double(), torch.float32, y, any_backend)
    torch.manual_seed(7)
    margin = 0.5 if kind == "arc" else 0.35
    drawn = torch.normal(margin, 0.05, size=(N,)).double()
    # the authors keep cos(theta + m) past pi: the problem stays where theta_y + m < pi
    theta = torch.acos((F.normalize(xf.double(), dim=1) * F.normalize(w.float().double()[y], dim=1)).sum(1))
    assert (theta + drawn).max() < math.pi
    theirs = _theirs(elasticface, xf.double(), w.float().double(), y, drawn, kind=kind, plus=plus)
    _assert_close(ours, theirs, TOL[torch.float32], (any_backend, kind, plus))


def test_heads_refuse_bad_settings_by_name():
    with pytest.raises(ValueError, match="kind must be one of"):
        ak.ElasticFaceLoss(C, D, kind="sphere")
    with pytest.raises(ValueError, match="l_a < u_a"):
        ak.MagFaceLoss(C, D, l_a=120.0)
    with pytest.raises(TypeError, match="h must be a float"):
        ak.AdaFaceLoss(C, D, h="0.3")
    for head in (ak.AdaFaceLoss(C, D), ak.MagFaceLoss(C, D), ak.ElasticFaceLoss(C, D, plus=True)):
        with pytest.raises(TypeError, match="embeddings must be"):
            head([[1.0] * D], torch.zeros(1, dtype=torch.int64))
        with pytest.raises(TypeError, match="labels must be int64"):
            head(torch.randn(2, D), torch.zeros(2, dtype=torch.int32))
