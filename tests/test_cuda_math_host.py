"""The CUDA epilogues' math on the host: csrc/margin_math.cuh and csrc/row_math.cuh are
`__host__ __device__`; a small harness (csrc/tests/math_harness.cpp) built here with the host C++
compiler evaluates them, and they must agree with arcface_kernels/margins.py and the loss rules
of docs/design.md sections 3-5, in float32. Needs only a C++ compiler: runs in CI without a GPU."""

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from arcface_kernels.margins import dphi_dcos, phi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")

M1S = (1.0, 1.35, 2.0, 4.0)
M2S = (0.0, 0.2, 0.5)
M3S = (0.0, 0.35)
TOL = 1e-6


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("harness") / "math_harness"
    source = f"{ROOT}/csrc/tests/math_harness.cpp"
    subprocess.run([CXX, "-O2", "-std=c++17", "-Wall", "-Werror", "-o", str(exe), source], check=True)

    def run(args, records, width):
        data = np.ascontiguousarray(records, dtype=np.float32).tobytes()
        out = subprocess.run([str(exe), *map(str, args)], input=data, capture_output=True, check=True).stdout
        return torch.from_numpy(np.frombuffer(out, dtype=np.float32).copy()).view(-1, width)

    return run


def _branch_cosines(m1, m2):
    """Cosines where m1 * acos(c) + m2 crosses k * pi (the rules switch there)."""
    thetas = [(k * math.pi - m2) / m1 for k in range(1, 6)]
    return [math.cos(t) for t in thetas if 0.0 <= t <= math.pi]


def _cosine_grid(m1, m2):
    """A dense grid over [-1, 1], the clamped outside, and both sides of every branch point (past
    pi - m2 for m1 = 1, past k pi / m1 for m1 != 1), at 1e-3 and 1e-5 in angle."""
    grid = [np.linspace(-1.0, 1.0, 2001), [-1.5, -1.0001, 1.0001, 1.5]]
    for c in _branch_cosines(m1, m2):
        theta = math.acos(c)
        grid.append(np.cos(theta + np.array([-1e-3, -1e-5, 1e-5, 1e-3])))
    return torch.from_numpy(np.concatenate(grid)).float()


def _near_branch(c, m1, m2):
    """Entries whose float32 angle lies within a few ulps of a branch point: there the two
    float32 evaluations may legitimately take different sides, so they are left out."""
    angle = m1 * torch.acos(c.double().clamp(-1, 1)) + m2
    distance = (angle / math.pi - torch.round(angle / math.pi)).abs() * math.pi
    return (distance < 1e-6) & (torch.round(angle / math.pi) >= 1)


def _angle_slack(c, m1, m2):
    """How far two correct float32 evaluations may differ beyond TOL: acosf and torch.acos may
    round the angle m1 * acos(c) + m2 a few ulps apart, and where phi or dphi/dc is steep in the
    angle (d dphi / d angle = m1 cos(angle) / sin(theta), large near c = -1 for big m1) that
    difference is amplified. Returns (phi slack, dphi/dc slack): 4 ulps of the angle times the
    slope, and for phi also 4 ulps of a value of order 1 (cosf's and m3's rounding), which the
    loss gradient multiplies by s (test_entry_gradient_matches_the_loss_rule)."""
    c = c.double().clamp(-1, 1)
    angle = m1 * torch.acos(c) + m2
    ulps = 4 * angle.abs() * 2.0**-23
    sin_theta = torch.sqrt(1 - c * c).clamp_min(1e-4)
    return ulps * torch.sin(angle).abs() + 4 * 2.0**-23, ulps * m1 * torch.cos(angle).abs() / sin_theta


def _close(out, ref, slack=0.0):
    return (out.double() - ref.double()).abs() <= TOL * ref.double().abs().clamp_min(1.0) + slack


@pytest.mark.parametrize("m1", M1S)
def test_phi_and_slope_match_margins_py(harness, m1):
    checked = 0
    for m2 in M2S:
        for m3 in M3S:
            for easy in (False, True):
                for straight in (False, True):
                    c = _cosine_grid(m1, m2)
                    keep = ~_near_branch(c, m1, m2)
                    flags = torch.tensor([m1, m2, m3, float(easy), float(straight)]).expand(len(c), 5)
                    out = harness(["margin"], torch.cat([c[:, None], flags], 1).numpy(), 2)
                    ref_phi = phi(c, m1, m2, m3, easy)
                    ref_slope = dphi_dcos(c, m1, m2, m3, easy, straight)
                    phi_slack, slope_slack = _angle_slack(c, m1, m2)
                    for name, o, r, slack in (("phi", out[:, 0], ref_phi, phi_slack),
                                              ("dphi/dc", out[:, 1], ref_slope, slope_slack)):
                        bad = keep & ~_close(o, r, slack)
                        assert not bad.any(), (
                            f"{name} m1={m1} m2={m2} m3={m3} easy={easy} straight={straight}: "
                            f"c={c[bad][:4].tolist()} cuda={o[bad][:4].tolist()} python={r[bad][:4].tolist()}")
                    # left out: at most the clamped c <= -1 (on the branch point when m2 = 0) and the
                    # 1e-5 neighbours of a branch point
                    assert keep.sum() >= len(c) - 8
                    checked += int(keep.sum())
    assert checked >= 24 * 2000  # every (m2, m3, easy, straight) setting


def test_branch_points_are_covered():
    """The grid reaches past pi - m (m1 = 1) and past k pi / m1 (m1 != 1), on both sides."""
    for m1 in M1S:
        for m2 in (0.2, 0.5):
            c = _cosine_grid(m1, m2).double()
            k = torch.floor((m1 * torch.acos(c.clamp(-1, 1)) + m2) / math.pi)
            assert (k == 0).any() and (k >= 1).any()
    assert len(_branch_cosines(4.0, 0.0)) == 4  # theta = k pi / 4, k = 1..4


def _python_gradient(c, is_target, m1, m2, m3, lse, grad, scale, eps, eps_c, easy, straight):
    """dz of docs/design.md section 5 through margins.py, float32 (as backends/chunked.py)."""
    z = scale * torch.where(is_target, phi(c, m1, m2, m3, easy), c)
    slope = dphi_dcos(c, m1, m2, m3, easy, straight)
    dz = torch.where(is_target, (torch.expm1(z - lse) + eps - eps_c) * slope, torch.exp(z - lse) - eps_c)
    return z, scale * grad * dz


@pytest.mark.parametrize("easy,straight", [(False, False), (True, False), (False, True)])
def test_entry_gradient_matches_the_loss_rule(harness, easy, straight):
    g = torch.Generator().manual_seed(0)
    n = 20000
    c = torch.rand(n, generator=g) * 2 - 1
    is_target = torch.rand(n, generator=g) < 0.5
    m1 = torch.tensor(M1S)[torch.randint(0, 4, (n,), generator=g)]
    m2 = torch.rand(n, generator=g) * 0.5
    m3 = torch.rand(n, generator=g) * 0.35
    scale = 64.0
    lse = scale * (torch.rand(n, generator=g) * 1.2 - 0.2)  # p from tiny to about 1
    grad = torch.rand(n, generator=g)
    eps, eps_c = 0.1, 0.1 / 1000
    keep = ~_near_branch(c, m1, m2)
    records = torch.stack([c, is_target.float(), m1, m2, m3, lse, grad, torch.full_like(c, scale),
                           torch.full_like(c, eps), torch.full_like(c, eps_c), torch.full_like(c, float(easy)),
                           torch.full_like(c, float(straight))], 1)
    out = harness(["gradient"], records.numpy(), 2)
    ref_z, ref_dcos = _python_gradient(c, is_target, m1, m2, m3, lse, grad, scale, eps, eps_c, easy, straight)
    assert keep.sum() > n - 10
    assert _close(out[keep, 0] / scale, ref_z[keep] / scale).all()
    # the target's dcos = s g (expm1(s phi - lse) + eps - eps / C) dphi/dc carries the slack of phi
    # and of dphi/dc (_angle_slack), each times the derivative of dcos in it
    z_y = torch.where(is_target, ref_z, 0.0).double()
    phi_slack, slope_slack = _angle_slack(c, m1, m2)
    slope = dphi_dcos(c, m1, m2, m3, easy, straight).double().abs()
    slack = scale * grad * (torch.expm1(z_y - lse).abs() + eps) * slope_slack
    slack = slack + scale * grad * slope * scale * torch.exp(z_y - lse) * phi_slack
    slack = torch.where(is_target, slack, 0.0)
    bad = keep & ~_close(out[:, 1], ref_dcos, slack)
    assert not bad.any(), f"c={c[bad][:4].tolist()} cuda={out[bad, 1][:4].tolist()} python={ref_dcos[bad][:4].tolist()}"


@pytest.mark.parametrize("k", [1, 3])
def test_class_cosine_takes_the_best_sub_centre(harness, k):
    g = torch.Generator().manual_seed(1)
    n = 500
    dots = torch.randn(n, k, generator=g)
    dots[:50, -1] = dots[:50, 0]  # ties: the lower sub-centre wins
    rw = torch.ones(n, k) if k == 1 else torch.rand(n, k, generator=g) + 0.5
    rw[:50, -1] = rw[:50, 0]
    rx = torch.rand(n, generator=g) + 0.5
    out = harness(["class_cosine", k], torch.cat([rx[:, None], dots, rw], 1).numpy(), 2)
    cos = dots * rx[:, None] * rw
    best, pick = cos.max(1)
    assert torch.equal(out[:, 0], best)
    assert torch.equal(out[:, 1].long(), pick)


@pytest.mark.parametrize("width,segments,threads", [(1, 1, 1), (7, 3, 4), (1000, 5, 8), (1000, 1, 256)])
def test_segment_statistics_merge_to_the_row_statistics(harness, width, segments, threads):
    """Online (max, sum-exp) per thread, merged over threads and segments in a fixed order (empty
    threads and segments included), equals the float64 statistics of the whole row."""
    g = torch.Generator().manual_seed(2)
    rows = 64
    c = torch.rand(rows, width, generator=g) * 2 - 1
    c[:8] = c[:8].round(decimals=1)  # ties for the best class
    z = 64.0 * c
    z[8:16] = z[8:16] * torch.linspace(0.0, 1.0, width)  # rising: every entry is a new max
    out = harness(["stats", width, segments, threads], torch.stack([z, c], 2).reshape(rows, -1).numpy(), 5)
    zd = z.double()
    row_max = zd.max(1).values
    sum_exp = torch.exp(zd - row_max[:, None]).sum(1)
    assert torch.equal(out[:, 0].double(), row_max)
    assert ((out[:, 1].double() - sum_exp).abs() <= 1e-5 * sum_exp).all()
    assert ((out[:, 2].double() - zd.sum(1)).abs() <= 1e-5 * zd.abs().sum(1)).all()
    best, best_class = c.max(1)  # torch.max returns the first maximal index
    assert torch.equal(out[:, 3], best)
    assert torch.equal(out[:, 4].long(), best_class)
