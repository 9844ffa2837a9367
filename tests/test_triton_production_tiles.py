"""The triton backend under TRITON_INTERPRET=1 with the tile shapes a GPU runs (configs.CONFIGS),
not the interpreter's small ones: problems that still span several row blocks, class tiles,
splits and backward chunks, against the float64 reference (run by test_triton_interpreter.py)."""

import os

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.backends import triton as triton_backend
from arcface_kernels.backends.triton.configs import CONFIGS
from helpers import assert_matches_reference, make_problem

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the interpreter")


@pytest.fixture(autouse=True)
def production_tiles(monkeypatch):
    monkeypatch.setattr(triton_backend, "tile_config", lambda kernel, interpreted=False: CONFIGS[kernel])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(sub_centers=2, label_smoothing=0.1, m1=1.2, m2=0.3, m3=0.1)],
                         ids=["arcface", "combined"])
def test_triton_production_tiles(dtype, options):
    k = options.get("sub_centers", 1)
    # forward: 4 row blocks of 64 (the last partial), 5 class tiles of 64 in 2 splits, D = 80 in
    # 3 steps of 32 (the last partial); gradient tile: 2 row blocks of 128
    n, c, d = 200, 300, 80
    x, w, y = make_problem(n, c, d, k=k, dtype=dtype, seed=11, ignore=(7,))
    budget = n * 128 * k * 4 + 128 * k * d * 16  # about one 128-class gradient chunk: several chunks
    with ak.workspace_budget(budget):
        assert_matches_reference(x, w, y, "triton", **options)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1)], ids=["arcface", "smoothing"])
def test_a_split_that_holds_only_the_targets(options):
    # 129 classes in 2 splits of 128 (the interpreter's wave of 8 programs, 4 row blocks): the
    # second split holds class 128 alone, so for rows labelled 128 its loop sees no non-target
    # class (a running max of -inf) and their loss is the target term merged after the loop
    x, w, y = make_problem(200, 129, 40, seed=5)
    y[::3] = 128
    assert triton_backend.class_splits(4, 129, CONFIGS["forward"].block_n, 8) == (128, 2)
    assert_matches_reference(x, w, y, "triton", **options)


# -- the non-target epilogue (nontarget=..., docs/design.md section 3c) at the production tiles ---------------------

def _nontarget_problem(n, c, d, k, dtype, seed=3):
    """Rows near their class centre (many non-target cosines on both sides of the row's
    threshold), K sub-centre rows per class, two ignored rows where N allows."""
    from test_nontarget import _near_centres

    x, w, y = _near_centres(n, c, d, seed=seed, spread=1.2)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.stack([w] + [w + 0.3 * torch.randn(w.shape, generator=g, dtype=w.dtype) for _ in range(k - 1)], dim=1)
    if n > 2:
        y[[1, n - 2]] = -100
    return x.to(dtype), w.reshape(c * k, d).to(dtype), y


def _nontarget_settings(mode, t=None):
    from test_nontarget import MODES

    return dict(MODES[mode], nontarget_t=MODES[mode]["nontarget_t"] if t is None else t)


# forward: 3 row blocks of 64 (the last partial), 3 class tiles of 64 (the last partial) in 2
# splits, D = 40 in 2 steps of 32; gradient tile: 2 row blocks of 128, 64-class chunks
NT_SHAPE = (150, 150, 40)


def _chunk_budget(n, k, d):
    return n * 64 * k * 4 + 64 * k * d * 16  # about one 64-class gradient chunk: three chunks


@pytest.mark.parametrize("mode, t, k, smoothing, dtype", [
    ("curricular", None, 3, 0.1, torch.float32),
    ("curricular", None, 1, 0.0, torch.float16),
    ("mv", None, 1, 0.1, torch.float32),
    ("filter", None, 1, 0.0, torch.float32),
    # below 0 every padding class's cosine (0 before it is masked) is "hard": it must stay out of every sum
    ("filter", -0.05, 3, 0.1, torch.float32),
], ids=["curricular-k3-smoothing", "curricular-fp16", "mv-smoothing", "filter", "filter-negative-t-k3"])
def test_nontarget_epilogue_at_production_tiles(mode, t, k, smoothing, dtype):
    from float64_oracle import oracle
    from test_nontarget import _hard_fraction

    from helpers import TOL, loss_and_grads, rel_err

    n, c, d = NT_SHAPE
    settings = _nontarget_settings(mode, t)
    x, w, y = _nontarget_problem(n, c, d, k, dtype)
    active = y >= 0
    hard = _hard_fraction(x[active].double(), w.double().view(c, k, d)[:, 0], y[active], settings)
    assert 0.02 < hard, hard  # both sides of the threshold (filter below 0: nearly every entry hard)
    with ak.workspace_budget(_chunk_budget(n, k, d)):
        out = loss_and_grads(x, w, y, backend="triton", sub_centers=k, label_smoothing=smoothing, **settings)
    ref = oracle(x, w, y, k=k, eps=smoothing, **settings)
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        assert rel_err(o, r) <= TOL[dtype], f"{mode} {name}: {rel_err(o, r):.3g}"


@pytest.mark.parametrize("mode", ["curricular", "mv", "filter"])
def test_nontarget_epilogue_on_one_row(mode):
    """N = 1: one row in a 64-row block (63 padding rows, their threshold +inf)."""
    from float64_oracle import oracle

    from helpers import TOL, loss_and_grads, rel_err

    x, w, y = _nontarget_problem(1, 150, 40, 1, torch.float32, seed=7)
    settings = _nontarget_settings(mode, t=-0.05 if mode == "filter" else None)
    out = loss_and_grads(x, w, y, backend="triton", **settings)
    ref = oracle(x, w, y, **settings)
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        assert rel_err(o, r) <= TOL[torch.float32], f"{mode} {name}: {rel_err(o, r):.3g}"


@pytest.mark.parametrize("other", ["reference", "torch"])
def test_nontarget_epilogue_is_reproducible_and_agrees_with(other):
    """Two calls give the same bits; the same float32 inputs through another backend that computes
    the epilogue agree to float32 rounding (a running t as a 0-d tensor, K = 3)."""
    from helpers import loss_and_grads, rel_err

    n, c, d = NT_SHAPE
    x, w, y = _nontarget_problem(n, c, d, 3, torch.float32, seed=9)
    settings = dict(m2=0.5, sub_centers=3, label_smoothing=0.1, nontarget="curricular",
                    nontarget_t=torch.tensor(0.4))
    with ak.workspace_budget(_chunk_budget(n, 3, d)):
        first = loss_and_grads(x, w, y, backend="triton", **settings)
        again = loss_and_grads(x, w, y, backend="triton", **settings)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "two calls differ"
    theirs = loss_and_grads(x, w, y, backend=other, **settings)
    for name, o, r in zip(("loss", "dX", "dW"), first, theirs):
        assert rel_err(o, r) <= 2e-5, f"{other} {name}: {rel_err(o, r):.3g}"
