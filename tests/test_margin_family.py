"""Issue 18, the per-row target rules: fallback="clip" (AdaFace's clipped angle, docs/design.md eq.
(3a)) and per-row m2, m3 that require grad (MagFace's margin of |x|, eq. (17a)), on every backend,
against a float64 materializing statement written here (it shares no code with the package)."""

import math

import pytest
import torch
import torch.nn.functional as F

import arcface_kernels as ak
from arcface_kernels.margins import dphi_dcos, dphi_dmargins, phi
from helpers import TOL, rel_err

N, C, D = 16, 10, 8


def _phi64(c, m2, m3, clip):
    """phi for m1 = 1: AdaFace's clip, or the threshold rule (eq. (3)) past pi - m2."""
    angle = torch.acos(c) + m2
    if clip is not None:
        return torch.cos(angle.clamp(clip, math.pi - clip)) - m3
    return torch.where(angle <= math.pi, torch.cos(angle) - m3, c - m3 - m2 * torch.sin(m2))


def _oracle(x, w, y, m2, m3, scale, clip):
    """Mean loss and the gradients of x, w, m2, m3 by float64 autograd, materializing N x C."""
    x, w, m2, m3 = (t.detach().double().requires_grad_(True) for t in (x, w, m2, m3))
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    target = _phi64(cos.gather(1, y[:, None])[:, 0], m2, m3, clip)
    logits = scale * torch.where(F.one_hot(y, w.shape[0]).bool(), target[:, None], cos)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), x.grad, w.grad, m2.grad, m3.grad


def _problem(dtype=torch.float32, seed=0):
    """Rows near theta = 0.1 from their centre, rows near theta = pi - 0.05 (past pi - m), the rest
    random; per-row m2 of both signs (AdaFace's g_ang is negative for large norms) and m3."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    unit = F.normalize(w[y], dim=1)
    side = F.normalize(x - (x * unit).sum(1, keepdim=True) * unit, dim=1)
    for rows, theta in ((slice(0, 4), 0.1), (slice(4, 8), math.pi - 0.05)):
        x[rows] = 3.0 * (math.cos(theta) * unit[rows] + math.sin(theta) * side[rows])
    m2 = torch.linspace(-0.3, 0.5, N, dtype=torch.float64)[torch.randperm(N, generator=g)]
    m3 = torch.linspace(0.0, 0.4, N, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), y, m2, m3


@pytest.mark.parametrize("clip", [None, 1e-3, 0.2])
def test_margin_slopes_are_the_derivatives_of_phi(clip):
    """dphi/dc, dphi/dm2, dphi/dm3 of margins.py against float64 autograd of the same rule, on both
    sides of the bounds (angle below eps, above pi - eps or past pi), easy_margin included."""
    c = torch.cat([torch.linspace(-0.999, 0.999, 401), torch.tensor([0.9995, -0.9995])]).double()
    held = 0
    for m2_value in (-0.3, 0.0, 0.5):
        for easy in (False, True):
            cc, m2, m3 = (t.clone().requires_grad_(True) for t in (c, torch.full_like(c, m2_value),
                                                                    torch.full_like(c, 0.2)))
            expected = _phi64(cc, m2, m3, clip)
            if easy:
                expected = torch.where(cc > 0, expected, cc)
            expected.sum().backward()
            value = phi(c, 1.0, m2.detach(), m3.detach(), easy, clip)
            assert torch.allclose(value, expected.detach(), rtol=0, atol=1e-12)
            # angles within 1e-9 of a bound or of pi are left out (one-sided derivatives)
            angle = torch.acos(c) + m2_value
            bounds = [math.pi] if clip is None else [clip, math.pi - clip]
            keep = torch.stack([(angle - b).abs() > 1e-9 for b in bounds]).all(0)
            d_c = dphi_dcos(c, 1.0, m2.detach(), m3.detach(), easy, clip=clip)
            d_m2, d_m3 = dphi_dmargins(c, 1.0, m2.detach(), easy, clip)
            for ours, theirs in ((d_c, cc.grad), (d_m2, m2.grad), (d_m3, m3.grad)):
                assert torch.allclose(ours[keep], theirs[keep], rtol=1e-9, atol=1e-9)
            held += int(((d_c[keep] == 0) & (d_m2[keep] == 0)).sum())
    assert (held > 20) == (clip is not None)  # the clip holds the angle at a bound: zero slopes there


@pytest.mark.parametrize("clip", [None, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_margin_gradients_and_clip_on_every_backend(any_backend, dtype, clip):
    """Loss, dX, dW and the per-row margins' gradients (target only, eq. (17a)) against float64
    autograd, with rows near theta = 0 and past pi - m."""
    if dtype == torch.float16 and any_backend in ("reference", "torch"):
        pytest.skip("float16 operands: the kernel backends' dtype")
    x, w, y, m2, m3 = _problem(dtype)
    xq, wq = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    m2q = m2.float().requires_grad_(True)
    m3q = m3.float().requires_grad_(True)
    fallback = "threshold" if clip is None else "clip"
    loss = ak.margin_softmax_loss(xq, wq, y, scale=16.0, m2=m2q, m3=m3q, fallback=fallback,
                                  clip_eps=clip or 1e-3, backend=any_backend)
    loss.backward()
    expected = _oracle(x, w, y, m2, m3, 16.0, clip)
    tol = TOL[dtype]
    ours_all = (loss.detach(), xq.grad, wq.grad, m2q.grad, m3q.grad)
    for name, ours, theirs in zip(("loss", "dX", "dW", "dm2", "dm3"), ours_all, expected):
        assert rel_err(ours, theirs) <= tol, (any_backend, name, rel_err(ours, theirs))
    assert m2q.grad.dtype == torch.float32 and (m3q.grad[y >= 0] != 0).all()


def test_clip_changes_only_the_rows_it_clips():
    """fallback="clip" with positive m2 differs from the threshold rule exactly on the rows past pi - m2."""
    x, w, y, _, _ = _problem(torch.float64)
    rows = {f: ak.margin_softmax_loss(x, w, y, m2=0.5, fallback=f, reduction="none", backend="torch")
            for f in ("threshold", "clip")}
    differs = (rows["threshold"] - rows["clip"]).abs() > 1e-12
    past = torch.acos(F.cosine_similarity(x, w[y])) + 0.5 > math.pi - 1e-3
    assert torch.equal(differs, past) and past.sum() == 4


def test_m1_that_requires_grad_is_refused_and_bad_settings_name_themselves():
    x, w, y, _, _ = _problem()
    with pytest.raises(ValueError, match="m1 requires grad"):
        ak.margin_softmax_loss(x, w, y, m1=torch.ones(N, requires_grad=True))
    with pytest.raises(ValueError, match="fallback must be one of"):
        ak.margin_softmax_loss(x, w, y, fallback="clamp")
    with pytest.raises(ValueError, match="clip_eps"):
        ak.margin_softmax_loss(x, w, y, fallback="clip", clip_eps=0.0)
