"""CurricularFaceLoss, MVSoftmaxLoss and CombinedMarginLoss's interclass_filtering_threshold (issue 18)
against the float64 transcriptions of the authors' heads (tests/authors_heads.py): loss, both
gradients and CurricularFace's running t over three training steps and an eval step, with rows
near theta = 0 and past pi - m. Backends: the reference, and each fused backend (and "auto")
once it declares the non-target epilogue."""

import math

import pytest
import torch
import torch.nn.functional as F
from authors_heads import CurricularFaceState, combined_margin_filtered, curricularface, mv_softmax

import arcface_kernels as ak
from arcface_kernels.backends import backend_status
from arcface_kernels.negatives import head_target_cosines
from helpers import TOL, rel_err

N, C, D = 13, 9, 16  # odd sizes


def _backends():
    out = ["reference"]
    for name in ("torch", "triton", "cuda"):
        ok, reason = backend_status(name, torch.device("cpu"))
        out.append(name if ok else pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {reason}")))
    return out + ["auto"]


BACKENDS = _backends()


def _problem(seed, thetas):
    """One weight for every seed (a head's steps), this seed's labels, and rows at angle thetas[i]
    from their class centre (nan: a random direction), of norms between 0.5 and 3."""
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    unit = F.normalize(w[y], dim=1)
    side = F.normalize(x - (x * unit).sum(1, keepdim=True) * unit, dim=1)
    thetas = torch.tensor(thetas, dtype=torch.float64)
    placed = torch.cos(thetas)[:, None] * unit + torch.sin(thetas)[:, None] * side
    x = torch.where(torch.isnan(thetas)[:, None], F.normalize(x, dim=1), placed)
    return x * torch.linspace(0.5, 3.0, N, dtype=torch.float64)[:, None], w, y


def _head(cls, w, backend, **settings):
    head = cls(C, D, backend=backend, **settings)
    with torch.no_grad():
        head.weight.copy_(w.float())
    return head


def _ours(head, x, y):
    head.weight.grad = None
    xq = x.float().requires_grad_(True)
    loss = head(xq, y)
    loss.backward()
    return loss.detach(), xq.grad, head.weight.grad


def _theirs(fn, x, w, y, *args, **kwargs):
    x, w = x.float().double().requires_grad_(True), w.float().double().requires_grad_(True)
    loss = fn(x, w, y, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _assert_close(ours, theirs, what):
    for name, a, b in zip(("loss", "dX", "dW"), ours, theirs):
        assert rel_err(a, b) <= TOL[torch.float32], (what, name, rel_err(a, b))


def _hard_share(x, w, y, threshold):
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    hard = (cos > threshold[:, None]) & ~F.one_hot(y, C).bool()
    return hard.double().sum().item() / (N * (C - 1))


# rows at theta = 0.02 and 0.1 (near their centre), past pi - m (pi - 0.3, pi - 0.1 with m = 0.5), random
CURRICULAR_THETAS = [0.02, 0.1, math.pi - 0.3, math.pi - 0.1, 1.0, 2.0, 0.4, 0.6, 0.8, 1.2] + [math.nan] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_curricularface_matches_the_authors_over_three_steps_and_in_eval(backend):
    _, w, _ = _problem(0, CURRICULAR_THETAS)
    head = _head(ak.CurricularFaceLoss, w, backend, t_alpha=0.3)  # a t_alpha that moves t visibly
    state = CurricularFaceState()
    for step in range(4):
        training = step < 3
        head.train(training)
        x, _, y = _problem(step, CURRICULAR_THETAS)
        cos_y = (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)
        threshold = torch.cos(torch.acos(cos_y) + 0.5)
        assert 0.05 < _hard_share(x, w, y, threshold) < 0.95  # both sides of the map
        ours = _ours(head, x, y)
        # eval: the authors' t must not move either (t_alpha = 0 leaves it)
        theirs = _theirs(curricularface, x, w, y, state, t_alpha=0.3 if training else 0.0)
        _assert_close(ours, theirs, (backend, step))
        assert abs(float(head.t) - float(state.t)) <= 1e-6, (step, float(head.t), float(state.t))
    assert float(state.t) > 0.1  # t moved, so the hard entries' map c (t + c) used a nonzero t


def test_curricularface_t_is_the_mean_over_labelled_rows_and_kept_without_any():
    x, w, y = _problem(1, CURRICULAR_THETAS)
    head = _head(ak.CurricularFaceLoss, w, "reference", t_alpha=0.5)
    y[[0, 4]] = -100
    head(x.float(), y)
    labelled = y >= 0
    cos_y = (F.normalize(x[labelled].float().double(), dim=1)
             * F.normalize(w.float().double()[y[labelled]], dim=1)).sum(1)
    assert abs(float(head.t) - 0.5 * float(cos_y.mean())) <= 1e-6
    before = head.t.clone()
    head(x.float(), torch.full_like(y, -100))
    assert torch.equal(head.t, before)
    head.eval()(x.float(), y)
    assert torch.equal(head.t, before)
    assert set(head.state_dict()) == {"t", "weight"} and head.t.shape == (1,)  # the authors' buffer


def test_curricularface_with_partial_fc_uses_the_targets_of_every_class():
    """Partial FC keeps every target class: t moves as in the full head (the sampled weight is
    only the loss's)."""
    x, w, y = _problem(2, CURRICULAR_THETAS)
    full = _head(ak.CurricularFaceLoss, w, "reference", t_alpha=0.5)
    sampled = _head(ak.CurricularFaceLoss, w, "reference", t_alpha=0.5, sample_rate=0.5)
    full(x.float(), y)
    sampled(x.float(), y)
    assert torch.equal(full.t, sampled.t) and float(full.t) != 0.0


def test_head_target_cosines_are_the_ops_with_sub_centres_and_ignored_rows():
    """The heads' gather-dot (target rows only) gives the op's own target cosines (the best of K
    sub-centres; 0 on ignored rows)."""
    x, w, y = _problem(5, CURRICULAR_THETAS)
    w2 = torch.cat([w, w + 0.5 * torch.randn_like(w)], dim=1).view(2 * C, D)  # K = 2 rows per class
    y[3] = -1
    got = head_target_cosines(x.float(), w2.float(), y, 2)
    _, stats = ak.margin_softmax_loss(x.float(), w2.float(), y, sub_centers=2, ignore_index=-1, return_stats=True,
                                      backend="reference")
    assert got[3] == 0 and rel_err(got, stats.target_cos) < 1e-6


# MV-Softmax: rows near theta = 0, at theta past pi - m, random; "am" compares where c_y > margin
MV_THETAS = {
    "arc": [0.02, 0.1, math.pi - 0.3, math.pi - 0.1, 1.0, 2.0] + [math.nan] * 7,
    "am": [0.02, 0.1, 0.5, 0.8, 1.0, 1.1] + [0.9] * 7,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["am", "arc"])
def test_mv_softmax_matches_the_authors(backend, kind):
    x, w, y = _problem(3, MV_THETAS[kind])
    cos_y = (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)
    if kind == "am":  # where the authors' target rule is c_y - m (their jump at c_y = m: docstring)
        assert (cos_y > 0.35).all()
        threshold = cos_y - 0.35
    else:
        assert (cos_y < 0).any()  # easy margin's other side
        threshold = torch.cos(torch.acos(cos_y) + 0.35)
    assert 0.05 < _hard_share(x, w, y, threshold) < 0.95
    head = _head(ak.MVSoftmaxLoss, w, backend, kind=kind)
    _assert_close(_ours(head, x, y), _theirs(mv_softmax, x, w, y, kind=kind), (backend, kind))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("branch", ["arcface", "cosface"])
def test_combined_margin_filtering_matches_insightface(backend, branch):
    # insightface's ArcFace branch has no fallback past pi - m2: rows stay below it
    x, w, y = _problem(4, [0.02, 0.1, 1.0, 2.0, 2.5] + [math.nan] * 8)
    margins = dict(m2=0.5, m3=0.0) if branch == "arcface" else dict(m2=0.0, m3=0.35)
    assert _hard_share(x, w, y, torch.full((N,), 0.2, dtype=torch.float64)) > 0.05
    head = _head(ak.CombinedMarginLoss, w, backend, interclass_filtering_threshold=0.2,
                 margin_grad="straight_through", **margins)  # insightface's ArcFace gradient
    theirs = _theirs(combined_margin_filtered, x, w, y, threshold=0.2, **margins)
    _assert_close(_ours(head, x, y), theirs, (backend, branch))
    assert (head.options.nontarget, head.options.nontarget_t) == ("filter", 0.2)
    # threshold 0 (insightface's default) is no filtering
    assert ak.CombinedMarginLoss(C, D, interclass_filtering_threshold=0.0, **margins).options.nontarget == "none"


@pytest.mark.parametrize("make, error, match", [
    (lambda: ak.MVSoftmaxLoss(C, D, kind="cos"), ValueError, "kind must be one of"),
    (lambda: ak.MVSoftmaxLoss(C, D, mv_weight=0.9), ValueError, "mv_weight must be >= 1"),
    (lambda: ak.CurricularFaceLoss(C, D, t_alpha=1.5), ValueError, "t_alpha must lie in"),
    (lambda: ak.CurricularFaceLoss(C, D, margin="0.5"), TypeError, "margin must be a float"),
    (lambda: ak.CombinedMarginLoss(C, D, interclass_filtering_threshold=-0.1), ValueError, "must be >= 0"),
    (lambda: ak.CombinedMarginLoss(C, D, interclass_filtering_threshold=0.2, nontarget="mv", nontarget_t=1.1),
     ValueError, "cannot be combined"),
])
def test_bad_settings_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_heads_check_their_inputs_before_moving_t():
    head = ak.CurricularFaceLoss(C, D, backend="reference")
    with pytest.raises(ValueError, match="labels must lie in"):
        head(torch.randn(2, D), torch.tensor([0, C]))
    with pytest.raises(TypeError, match="labels must be int64"):
        head(torch.randn(2, D), torch.zeros(2, dtype=torch.int32))
    assert float(head.t) == 0.0
