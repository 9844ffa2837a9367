"""The float64 transcriptions of the authors' heads (tests/authors_heads.py) against the
independent oracle (tests/float64_oracle.py) where a head reduces to ArcFace or CosFace: the
groundwork for issue 18, whose fused heads will be checked against these transcriptions."""

import pytest
import torch
from authors_heads import (
    AdaFaceState,
    CurricularFaceState,
    adaface,
    combined_margin_filtered,
    curricularface,
    elastic_margins,
    elasticface,
    magface,
    mv_softmax,
)
from float64_oracle import oracle

N, C, D = 12, 9, 16


def _problem(aligned=False, norm=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    if aligned:  # target cosines near 0.95: margins apply, nothing past the fallback point
        x = 4 * w[y] / w[y].norm(dim=1, keepdim=True) + 0.3 * x / x.norm(dim=1, keepdim=True) * w.norm(dim=1).mean()
    x = norm * x / x.norm(dim=1, keepdim=True)
    return x, w, y


def _grads(head, x, w, *args, **kwargs):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = head(x, w, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _close(ours, theirs, tol=1e-10):
    """Relative norm error; the aligned problems' losses are ~1e-7 and the authors' plain
    log-softmax computes them as a difference of numbers near 60: 1e-16 * 60 / 1e-7 relative."""
    for a, b in zip(ours, theirs):
        assert (a - b).norm() <= tol * max(b.norm(), 1e-300), (a, b)


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elasticface_with_equal_margins_is_arcface_or_cosface(kind):
    x, w, y = _problem()
    m = 0.5 if kind == "arc" else 0.35
    margins = torch.full((N,), m, dtype=torch.float64)
    expected = oracle(x, w, y, m2=m) if kind == "arc" else oracle(x, w, y, m2=0.0, m3=m)
    _close(_grads(elasticface, x, w, y, margins, kind=kind), expected)


def test_elasticface_plus_gives_the_smallest_margins_to_the_closest_rows():
    target_cos = torch.tensor([0.1, 0.9, 0.5, -0.2], dtype=torch.float64)
    margins = torch.tensor([0.52, 0.47, 0.55, 0.49], dtype=torch.float64)
    assert elastic_margins(target_cos, margins, plus=True).tolist() == [0.52, 0.47, 0.49, 0.55]
    assert elastic_margins(target_cos, margins, plus=False) is margins


def test_adaface_without_norm_adaptivity_is_cosface():
    x, w, y = _problem(norm=30.0)
    state = AdaFaceState()
    expected = oracle(x, w, y, m2=0.0, m3=0.4)
    _close(_grads(adaface, x, w, y, state, h=0.0), expected)
    # the running statistics moved towards this batch's norms (all 30) as the authors' EMA
    assert abs(float(state.batch_mean) - (0.01 * 30 + 0.99 * 20)) < 1e-12


def test_mv_softmax_with_unit_weight_is_am_softmax():
    x, w, y = _problem(aligned=True)
    _close(_grads(mv_softmax, x, w, y, mv_weight=1.0, kind="am"), oracle(x, w, y, scale=32.0, m2=0.0, m3=0.35),
           tol=1e-6)


def test_curricularface_without_hard_examples_is_arcface():
    x, w, y = _problem(aligned=True)
    state = CurricularFaceState()
    _close(_grads(curricularface, x, w, y, state), oracle(x, w, y, m2=0.5), tol=1e-6)
    assert float(state.t) != 0.0  # updated from the target cosines before use


def test_magface_below_the_norm_range_is_arcface_plus_a_constant():
    x, w, y = _problem(aligned=True, norm=5.0)  # |x| = 5 < l_a = 10: margin l_margin, no norm gradient
    loss, dx, dw = _grads(magface, x, w, y)
    ref_loss, ref_dx, ref_dw = oracle(x, w, y, m2=0.45)
    assert abs(float(loss - 35.0 * (10.0 / 110.0**2 + 1 / 10.0) - ref_loss)) < 1e-6 * float(ref_loss)
    _close((dx, dw), (ref_dx, ref_dw), tol=1e-6)


def test_interclass_filtering_above_every_cosine_changes_nothing():
    x, w, y = _problem()
    plain = _grads(combined_margin_filtered, x, w, y)
    assert float(plain[0]) == pytest.approx(float(oracle(x, w, y, m2=0.5)[0]), rel=1e-12)
    _close(_grads(combined_margin_filtered, x, w, y, threshold=0.999), plain)
    filtered = _grads(combined_margin_filtered, x, w, y, threshold=0.1)
    assert (filtered[1] - plain[1]).norm() > 1e-3 * plain[1].norm()
