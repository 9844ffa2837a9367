"""The non-target epilogue (nontarget="curricular" | "mv" | "filter", docs/design.md section 3c):
the reference against the authors' heads (tests/authors_heads.py) and every backend that computes
it against the independent float64 oracle (tests/float64_oracle.py)."""

import copy

import authors_heads as authors
import pytest
import torch
from float64_oracle import oracle

import arcface_kernels as ak
from arcface_kernels.backends import backend_status, get_backend
from conftest import DEVICE
from helpers import TOL, loss_and_grads, rel_err

MODES = {  # settings of each mode, with t: CurricularFace's running t, MV-Softmax's weight, the threshold
    "curricular": dict(m2=0.5, nontarget="curricular", nontarget_t=0.3),
    "mv": dict(scale=32.0, m2=0.35, nontarget="mv", nontarget_t=1.12),
    "filter": dict(m2=0.0, m3=0.35, nontarget="filter", nontarget_t=0.2),
}


def _near_centres(n, c, d, seed=0, spread=0.6):
    """Rows around their class centre, so that target cosines spread over (0, 1) and many
    non-target cosines lie on both sides of the row's threshold."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x = w[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64) * w.norm(dim=1).mean() / d**0.5
    return x, w, y


def _grads(loss_fn, x, w):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = loss_fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _assert_close(out, ref, tol, what):
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        err = rel_err(o, r)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:.1g}"


def _hard_fraction(x, w, y, settings):
    """The share of non-target entries the map changes (the test must exercise both sides)."""
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    cos_y = cos.gather(1, y[:, None])
    if settings["nontarget"] == "filter":
        threshold = settings["nontarget_t"]
    else:
        threshold = torch.cos(torch.acos(cos_y) + settings.get("m2", 0.5)) - settings.get("m3", 0.0)
    hard = (cos > threshold) & ~torch.nn.functional.one_hot(y, w.shape[0]).bool()
    return hard.double().mean().item()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reference_equals_the_authors_heads(mode):
    x, w, y = _near_centres(24, 11, 8, spread=1.2)
    settings = MODES[mode]
    assert 0.02 < _hard_fraction(x, w, y, settings) < 0.9
    state = authors.CurricularFaceState()
    state.t = torch.tensor(0.3, dtype=torch.float64)
    heads = {
        # t_alpha = 0: the authors' update would move t before use; the heads' test covers the update
        "curricular": lambda a, b: authors.curricularface(a, b, y, copy.deepcopy(state), t_alpha=0.0),
        "mv": lambda a, b: authors.mv_softmax(a, b, y, kind="arc"),
        "filter": lambda a, b: authors.combined_margin_filtered(a, b, y, m2=0.0, m3=0.35, threshold=0.2),
    }
    # MV-Softmax's arc branch keeps the plain cosine where the target cosine is <= 0: easy_margin
    extra = dict(easy_margin=True) if mode == "mv" else {}
    ours = _grads(lambda a, b: ak.margin_softmax_loss(a, b, y, backend="reference", **settings, **extra), x, w)
    _assert_close(ours, _grads(heads[mode], x, w), 1e-12, f"reference {mode}")


def test_mv_softmax_am_threshold_is_the_cosine_minus_the_margin():
    """kind="am": hard above c_y - m (eq. (N3) with m1 = 1, m2 = 0), on rows whose target cosine
    exceeds m (where the authors' target rule is c_y - m, ours for every row)."""
    x, w, y = _near_centres(24, 11, 8, spread=0.3)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    assert (cos.gather(1, y[:, None]) > 0.35).all()
    settings = dict(scale=32.0, m2=0.0, m3=0.35, nontarget="mv", nontarget_t=1.12)
    assert _hard_fraction(x, w, y, settings) > 0.02
    ours = _grads(lambda a, b: ak.margin_softmax_loss(a, b, y, backend="reference", **settings), x, w)
    _assert_close(ours, _grads(lambda a, b: authors.mv_softmax(a, b, y, kind="am"), x, w), 1e-12, "mv am")


def _fused_backends():
    out = []
    for name in ("torch", "triton", "cuda"):
        ok, reason = backend_status(name, DEVICE)
        if not ok:
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")))
        elif not get_backend(name).nontarget_epilogue:
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: no non-target epilogue")))
        else:
            out.append(name)
    return out


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_backends_match_the_float64_oracle(backend, mode, dtype):
    check_fused_backend(backend, mode, dtype, DEVICE)


def check_fused_backend(backend, mode, dtype, device):
    """Odd sizes over several tiles and chunks, sub-centres, an ignored row, label smoothing; the
    backend runs on `device`, the oracle on the CPU. (tests/test_cuda_glue.py runs it for the
    `cuda` backend on CPU stand-ins of its ops.)"""
    x, w, y = _near_centres(37, 70, 19, seed=1, spread=1.2)
    assert _hard_fraction(x, w, y, MODES[mode]) > 0.05
    w = torch.cat([w, w + 0.3 * torch.randn_like(w)], dim=1).view(140, 19)  # K = 2 sub-centres per class
    y[5] = -100
    settings = dict(MODES[mode], sub_centers=2, label_smoothing=0.1)
    x, w = x.to(dtype), w.to(dtype)
    with ak.workspace_budget(32 * 1024):
        out = loss_and_grads(x.to(device), w.to(device), y.to(device), backend=backend, **settings)
    oracle_settings = {k: v for k, v in settings.items() if k not in ("sub_centers", "label_smoothing")}
    ref = oracle(x, w, y, k=2, eps=0.1, **oracle_settings)
    _assert_close([o.cpu() for o in out], ref, TOL[dtype], f"{backend} {mode} {dtype}")


def test_a_backend_without_the_epilogue_refuses_it(monkeypatch):
    """No silent plain loss: a backend that does not compute the epilogue raises."""
    import dataclasses

    from arcface_kernels.backends import registry

    plain = dataclasses.replace(get_backend("torch"), nontarget_epilogue=False)
    monkeypatch.setitem(registry._BACKENDS, "torch", plain)
    x, w, y = _near_centres(6, 5, 4)
    with pytest.raises(NotImplementedError, match="non-target epilogue"):
        ak.margin_softmax_loss(x.float(), w.float(), y, backend="torch", **MODES["mv"])


@pytest.mark.parametrize("bad, error, match", [
    (dict(nontarget="hard"), ValueError, "nontarget must be one of"),
    (dict(nontarget="mv", nontarget_t=0.9), ValueError, "must be >= 1"),
    (dict(nontarget="curricular", nontarget_t=torch.tensor(0.1, requires_grad=True)), ValueError, "t.detach"),
    (dict(nontarget="filter", nontarget_t=float("nan")), ValueError, "finite"),
])
def test_bad_settings_are_named(bad, error, match):
    x, w, y = _near_centres(4, 5, 3)
    with pytest.raises(error, match=match):
        ak.margin_softmax_loss(x, w, y, backend="reference", **bad)


def test_a_running_t_tensor_is_read_on_the_device_and_not_differentiated():
    """CurricularFace's t as a 0-d buffer: the same loss as the float, no gradient to it."""
    x, w, y = _near_centres(10, 7, 5)
    t = torch.tensor(0.25, dtype=torch.float64)
    a = ak.margin_softmax_loss(x, w, y, backend="reference", nontarget="curricular", nontarget_t=t)
    b = ak.margin_softmax_loss(x, w, y, backend="reference", nontarget="curricular", nontarget_t=0.25)
    assert torch.equal(a, b)
