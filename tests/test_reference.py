"""The reference head against an independent float64 formula written row by row."""

import math

import pytest
import torch
from float64_oracle import loss_by_rows, oracle

import arcface_kernels as ak
from helpers import make_problem, rel_err


@pytest.mark.parametrize(
    "m1,m2,m3,k,eps",
    [(1.0, 0.5, 0.0, 1, 0.0), (1.0, 0.0, 0.35, 2, 0.0), (1.35, 0.0, 0.0, 1, 0.1), (1.2, 0.3, 0.2, 3, 0.05),
     (1.0, 1.5, 0.0, 1, 0.0), (2.5, 0.4, 0.1, 1, 0.0)],
)
def test_reference_equals_rowwise_formula(m1, m2, m3, k, eps):
    x, w, y = make_problem(6, 9, 5, k=k, dtype=torch.float64, seed=3)
    # Make one row nearly anti-parallel to its target so the fallbacks are exercised.
    x[0] = -w[y[0] * k]
    expected = loss_by_rows(x, w, y, 8.0, m1, m2, m3, k, eps)
    got = ak.margin_softmax_loss(x, w, y, scale=8.0, m1=m1, m2=m2, m3=m3, sub_centers=k,
                                 label_smoothing=eps, reduction="none", backend="reference")
    # acos at c = -1 is sqrt-sensitive: 1e-16 in c becomes ~1e-8 in the angle.
    assert rel_err(got, expected) < 1e-7


def test_phi_is_monotone_and_continuous_past_pi():
    c = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (2.0, 0.3, 0.1), (4.0, 0.0, 0.0)]:
        values = ak.margins.phi(c, m1, m2, m3)
        steps = values.diff()
        assert (steps >= -1e-12).all(), (m1, m2, m3)
        if m1 != 1.0:  # SphereFace's extension is continuous; the m1 == 1 rule jumps by design
            assert steps.abs().max() < 5e-2  # steep near c = -1 (dtheta/dc is unbounded), no jump


def test_dphi_matches_finite_differences():
    c = torch.linspace(-0.97, 0.97, 101, dtype=torch.float64)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (2.0, 0.3, 0.1), (1.0, 0.0, 0.35)]:
        h = 1e-6
        numeric = (ak.margins.phi(c + h, m1, m2, m3) - ak.margins.phi(c - h, m1, m2, m3)) / (2 * h)
        analytic = ak.margins.dphi_dcos(c, m1, m2, m3)
        # Exclude the few points where a fallback rule switches inside [c - h, c + h].
        smooth = (numeric - analytic).abs() < 1e-3 * (1 + analytic.abs())
        assert smooth.float().mean() > 0.97


def test_vectorized_oracle_equals_rowwise_formula():
    # The two float64 statements in float64_oracle.py agree with each other.
    x, w, y = make_problem(5, 7, 4, k=2, dtype=torch.float64, seed=4)
    x[1] = -w[y[1] * 2]
    rows, _, _ = oracle(x, w, y, scale=8.0, m1=1.2, m2=0.3, m3=0.1, k=2, eps=0.1, reduction="none")
    assert rel_err(rows, loss_by_rows(x, w, y, 8.0, 1.2, 0.3, 0.1, 2, 0.1)) < 1e-12


@pytest.mark.parametrize("m1", [1.0, 1.35, 2.5])
def test_dphi_at_cos_one_is_its_limit_where_finite(m1):
    # m2 = 0: d/dc cos(m1 acos c) -> m1^2 as c -> 1 (cos(m1 t) ~ 1 - m1^2 t^2 / 2, 1 - c ~ t^2 / 2).
    one = torch.ones(1, dtype=torch.float64)
    assert ak.margins.dphi_dcos(one, m1, 0.0, 0.1).item() == pytest.approx(m1 * m1, rel=1e-12)
    near = torch.tensor([1 - 1e-14, 1 - 1e-9], dtype=torch.float64)
    assert torch.allclose(ak.margins.dphi_dcos(near, m1, 0.0, 0.0), torch.full((2,), m1 * m1, dtype=torch.float64),
                          rtol=1e-6)


def test_dphi_where_the_true_derivative_is_unbounded_is_the_floored_value():
    # m2 != 0 at c = 1: m1 sin(m1 t + m2) / sin(t) is unbounded; the floor makes it finite.
    one = torch.ones(1, dtype=torch.float64)
    m1, m2 = 1.0, 0.5
    floored = m1 * m1 * math.cos(m2) + m1 * math.sin(m2) / ak.margins.SIN_FLOOR
    assert ak.margins.dphi_dcos(one, m1, m2, 0.0).item() == pytest.approx(floored, rel=1e-12)
    # m1 = 1 at c = -1: past pi the fallback c - m3 - m2 sin(m2) has slope 1, its limit.
    for m2 in (0.0, 0.5):
        assert ak.margins.dphi_dcos(-one, 1.0, m2, 0.0).item() == 1.0
    assert torch.isfinite(ak.margins.dphi_dcos(-one, 1.35, 0.2, 0.0)).all()


def test_reference_normalizes_rows_up_to_the_largest_float():
    x, w, y = make_problem(5, 7, 4, seed=6)
    x[0] *= 1e38 / x[0].abs().max()
    w[1] *= 1e38 / w[1].abs().max()
    got = ak.margin_softmax_loss(x, w, y, scale=8.0, reduction="none", backend="reference")
    want, _, _ = oracle(x, w, y, scale=8.0, reduction="none")
    assert rel_err(got, want) < 1e-5
