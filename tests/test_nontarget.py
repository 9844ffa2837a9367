"""The non-target epilogue (nontarget="curricular" | "mv" | "filter", docs/design.md section 3c):
the reference against the authors' heads (tests/authors_heads.py) and every backend that computes
it against the independent float64 oracle (tests/float64_oracle.py)."""

import copy

import authors_heads as authors
import pytest
import torch
from float64_oracle import oracle

import arcface_kernels as ak
from arcface_kernels.backends import backend_status
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
        out.append(name if ok else pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")))
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


# -- the `torch` backend (backends/chunked.py): its two walks, the fused C++ CPU epilogue and torch ops

def _torch_walks(monkeypatch, run):
    """run() with the fused CPU epilogue (when built) and with torch ops alone."""
    from arcface_kernels.backends import chunked

    out = {}
    if chunked._CPU_OPS is not None:
        out["fused"] = run()
    with monkeypatch.context() as m:
        m.setattr(chunked, "_CPU_OPS", None)
        out["torch ops"] = run()
    return out


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dtype, k", [(torch.float32, 1), (torch.float32, 2), (torch.float16, 1),
                                      (torch.bfloat16, 2), (torch.float64, 1)])
def test_torch_walks_agree_and_match_the_oracle(monkeypatch, mode, dtype, k):
    """Both walks against the oracle and each other (float32, K = 1: the fused walk reads W_c
    itself, `_Walk.raw_w`; the others go through ws), several chunks, label smoothing, an ignored
    row, a per-row upstream gradient."""
    x, w, y = _near_centres(13, 37, 11, seed=3, spread=1.2)
    assert _hard_fraction(x, w, y, MODES[mode]) > 0.05
    if k == 2:
        w = torch.stack([w, w + 0.2 * torch.randn_like(w)], dim=1).reshape(37 * k, 11)
    y[4] = -100
    settings = dict(MODES[mode], sub_centers=k, label_smoothing=0.1, reduction="none")
    x, w = x.to(dtype), w.to(dtype)

    def run():
        with ak.workspace_budget(6000):  # a few classes per chunk
            return loss_and_grads(x, w, y, backend="torch", **settings)

    walks = _torch_walks(monkeypatch, run)
    oracle_settings = {key: v for key, v in settings.items() if key not in ("sub_centers", "label_smoothing")}
    want = oracle(x, w, y, k=k, eps=0.1, row_weights=torch.linspace(0.5, 1.5, 13, dtype=torch.float64),
                  **oracle_settings)
    for walk, got in walks.items():
        _assert_close(got, want, TOL[dtype], f"{walk} {mode} {dtype} K={k}")
    if "fused" in walks:  # the same ops in the same order but exp and the sums' lane order: rounding only
        rounding = {torch.float64: 1e-13}.get(dtype, 1e-5)
        _assert_close(walks["fused"], walks["torch ops"], rounding, f"fused vs torch ops {mode} {dtype} K={k}")


@pytest.mark.parametrize("n", [0, 1])
def test_torch_walks_on_empty_and_single_row_batches(monkeypatch, n):
    x, w, y = _near_centres(max(n, 1), 9, 5, seed=4)
    x, w, y = x[:n].float(), w.float(), y[:n]
    walks = _torch_walks(monkeypatch, lambda: loss_and_grads(x, w, y, backend="torch", reduction="sum",
                                                             **MODES["curricular"]))
    want = oracle(x, w, y, reduction="sum", **MODES["curricular"])
    for walk, got in walks.items():
        assert [t.shape for t in got] == [t.shape for t in want], walk
        for o, r in zip(got, want):
            assert torch.allclose(o.double(), r, rtol=1e-5, atol=1e-6), walk


def test_torch_backend_is_bit_reproducible(monkeypatch):
    """Two calls, same bits, in both walks (one mode: the three share every op but the coefficients)."""
    x, w, y = _near_centres(19, 41, 13, seed=5, spread=1.2)
    x, w = x.float(), w.float()

    def run():
        with ak.workspace_budget(6000):
            return loss_and_grads(x, w, y, backend="torch", label_smoothing=0.1, **MODES["curricular"])

    first, second = _torch_walks(monkeypatch, run), _torch_walks(monkeypatch, run)
    for walk in first:
        assert all(torch.equal(a, b) for a, b in zip(first[walk], second[walk])), walk


def test_torch_backend_with_per_row_margins(monkeypatch):
    """m2 as an (N,) tensor (ElasticFace-style): the threshold of each row uses its own margin."""
    x, w, y = _near_centres(17, 23, 9, seed=6, spread=1.2)
    x, w = x.float(), w.float()
    m2 = torch.linspace(0.2, 0.6, 17)
    settings = dict(MODES["curricular"], m2=m2)
    assert _hard_fraction(x.double(), w.double(), y, dict(settings, m2=m2[:, None].double())) > 0.05
    walks = _torch_walks(monkeypatch, lambda: loss_and_grads(x, w, y, backend="torch", **settings))
    want = oracle(x, w, y, **dict(settings, m2=m2.double()))
    for walk, got in walks.items():
        _assert_close(got, want, TOL[torch.float32], f"{walk} per-row m2")


def test_torch_backend_top1_stays_on_the_plain_cosines(monkeypatch):
    """The filter zeroes every hard negative: lse changes, top1 and target_cos do not."""
    x, w, y = _near_centres(21, 31, 8, seed=7, spread=1.5)
    x, w = x.float(), w.float()
    settings = dict(scale=16.0, m2=0.0, m3=0.35)
    walks = _torch_walks(monkeypatch, lambda: (
        ak.margin_softmax_loss(x, w, y, backend="torch", return_stats=True, **settings)[1],
        ak.margin_softmax_loss(x, w, y, backend="torch", return_stats=True, nontarget="filter", nontarget_t=-0.1,
                               **settings)[1]))
    for walk, (plain, filtered) in walks.items():
        assert not torch.allclose(plain.lse, filtered.lse), walk
        assert torch.equal(plain.top1, filtered.top1) and torch.equal(plain.target_cos, filtered.target_cos), walk


@pytest.mark.parametrize("k", [1, 2])
def test_torch_backend_never_allocates_n_by_c_and_keeps_the_budget_with_the_epilogue(monkeypatch, k):
    """With the mode on, in both walks: tests/test_no_nxc.py's bound on the largest tensor and
    tests/test_workspace.py's on the peak live bytes (budget + gradients + O(N + C)); the
    torch-ops walk's mask and map tiles are counted in its chunk size (chunk_classes)."""
    from alloc_probe import LargestAllocation
    from bench.live_bytes import LiveBytes

    n, c, d = 256, 4096, 16  # one float32 N x C matrix: 4 MiB, above the budget
    budget = 2 * 2**20
    x, w, y = _near_centres(n, c, d, seed=9)
    x, w = x.float(), w.float().repeat_interleave(k, 0)
    y[3] = -100

    def run():
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with ak.workspace_budget(budget), LargestAllocation() as largest, LiveBytes() as live:
            ak.margin_softmax_loss(xg, wg, y, backend="torch", sub_centers=k, label_smoothing=0.1,
                                   **MODES["curricular"]).backward()
        return largest, live.peak

    gradients = x.numel() * 8 + w.numel() * 4  # dX in float32 and its cast, dW
    statistics = 8 * 4 * (n + c * k)
    for walk, (largest, peak) in _torch_walks(monkeypatch, run).items():
        assert largest.largest < n * c, (walk, largest.largest_op)
        assert largest.largest <= max(c * k * d, budget // 4), (walk, largest.largest, largest.largest_op)
        assert peak <= budget + gradients + statistics, (walk, peak, budget)
