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
    """How far two correct float32 evaluations of phi may differ beyond TOL: acosf and torch.acos
    may round the angle m1 * acos(c) + m2 a few ulps apart, amplified where phi is steep in the
    angle, plus 4 ulps of a value of order 1 (cosf's and m3's rounding)."""
    c = c.double().clamp(-1, 1)
    angle = m1 * torch.acos(c) + m2
    ulps = 4 * angle.abs() * 2.0**-23
    return ulps * torch.sin(angle).abs() + 4 * 2.0**-23


def _close(out, ref, slack=0.0):
    return (out.double() - ref.double()).abs() <= TOL * ref.double().abs().clamp_min(1.0) + slack


@pytest.mark.parametrize("m1", M1S)
def test_phi_matches_margins_py(harness, m1):
    checked = 0
    for m2 in M2S:
        for m3 in M3S:
            for easy in (False, True):
                c = _cosine_grid(m1, m2)
                keep = ~_near_branch(c, m1, m2)
                flags = torch.tensor([m1, m2, m3, float(easy)]).expand(len(c), 4)
                out = harness(["margin"], torch.cat([c[:, None], flags], 1).numpy(), 1)
                bad = keep & ~_close(out[:, 0], phi(c, m1, m2, m3, easy), _angle_slack(c, m1, m2))
                assert not bad.any(), (f"phi m1={m1} m2={m2} m3={m3} easy={easy}: c={c[bad][:4].tolist()} "
                                       f"cuda={out[bad, 0][:4].tolist()}")
                # left out: at most the clamped c <= -1 (on the branch point when m2 = 0) and the
                # 1e-5 neighbours of a branch point
                assert keep.sum() >= len(c) - 8
                checked += int(keep.sum())
    assert checked >= 12 * 2000  # every (m2, m3, easy) setting


def test_branch_points_are_covered():
    """The grid reaches past pi - m (m1 = 1) and past k pi / m1 (m1 != 1), on both sides."""
    for m1 in M1S:
        for m2 in (0.2, 0.5):
            c = _cosine_grid(m1, m2).double()
            k = torch.floor((m1 * torch.acos(c.clamp(-1, 1)) + m2) / math.pi)
            assert (k == 0).any() and (k >= 1).any()
    assert len(_branch_cosines(4.0, 0.0)) == 4  # theta = k pi / 4, k = 1..4


# dphi/dc's float32 evaluations differ by acosf's and sinf's rounding, amplified where the slope is
# steep in the angle; over the grids below C++ and torch agree within 1e-5 (relative, at least 1),
# within the float32 error of margins.dphi_dcos itself against float64 (up to 9e-5 near c = -1).
SLOPE_TOL = 2e-5


@pytest.mark.parametrize("m1", M1S)
def test_dphi_dcos_matches_margins_py(harness, m1):
    """dphi/dc of csrc/margin_math.cuh (the CPU extension's row finish) against margins.dphi_dcos:
    every branch (sinc ratio below pi / 2, floored sin(theta) above, the m1 = 1 fallback past pi,
    SphereFace's sign), easy_margin, straight_through and the clip rule."""
    for m2 in M2S + (-0.3,):
        for easy in (False, True):
            for straight in (False, True):
                for clip in (None, 1e-3, 0.05):
                    if m2 < 0 and clip is None:
                        continue  # a negative m2 is AdaFace's, under the clip rule
                    c = _cosine_grid(m1, abs(m2))
                    keep = ~_near_branch(c, m1, m2)
                    flags = torch.tensor([m1, m2, float(easy), float(straight), float(clip is not None),
                                          clip or 0.0]).expand(len(c), 6)
                    out = harness(["slope"], torch.cat([c[:, None], flags], 1).numpy(), 1)[:, 0]
                    ref = dphi_dcos(c, m1, m2, 0.0, easy, straight, clip)
                    err = (out.double() - ref.double()).abs() / ref.double().abs().clamp_min(1.0)
                    bad = keep & ~(err <= SLOPE_TOL)
                    assert not bad.any(), (m2, easy, straight, clip, c[bad][:4].tolist(), out[bad][:4].tolist(),
                                           ref[bad][:4].tolist())


@pytest.mark.parametrize("easy", [False, True])
def test_entry_logit_and_gradient_match_the_loss_rule(harness, easy):
    """z of docs/design.md eq. (9) and dcos of eqs. (15)-(17): s g (p - eps/C) off the target, the
    row's target_dcos (op.target_cosine_gradient's, passed in) on it."""
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
    target_dcos = torch.randn(n, generator=g) * 100
    eps_c = 0.1 / 1000
    keep = ~_near_branch(c, m1, m2)
    records = torch.stack([c, is_target.float(), m1, m2, m3, lse, grad, target_dcos, torch.full_like(c, scale),
                           torch.full_like(c, eps_c), torch.full_like(c, float(easy))], 1)
    out = harness(["gradient"], records.numpy(), 2)
    ref_z = scale * torch.where(is_target, phi(c, m1, m2, m3, easy), c)
    ref_dcos = torch.where(is_target, target_dcos, scale * grad * (torch.exp(scale * c - lse) - eps_c))
    assert keep.sum() > n - 10
    assert _close(out[keep, 0] / scale, ref_z[keep] / scale, _angle_slack(c, m1, m2)[keep]).all()
    assert torch.equal(out[is_target, 1], target_dcos[is_target])
    assert _close(out[:, 1], ref_dcos).all()


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
    cos = dots * (rx[:, None] * rw)  # one factor rx rw (docs/design.md eq. (7a))
    best, pick = cos.max(1)
    assert torch.equal(out[:, 0], best)
    assert torch.equal(out[:, 1].long(), pick)


def test_class_cosine_propagates_a_nan_sub_centre(harness):
    """As torch.max: a NaN in any sub-centre makes the class's cosine NaN (a skipped NaN row would
    give a finite wrong loss)."""
    dots = torch.tensor([[0.1, 0.5, float("nan")], [float("nan"), 0.5, 0.2], [0.1, float("nan"), 0.2]])
    records = torch.cat([torch.ones(3, 1), dots, torch.ones(3, 3)], 1)
    out = harness(["class_cosine", 3], records.numpy(), 2)
    assert torch.isnan(out[:, 0]).all()


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
    out = harness(["stats", width, segments, threads], torch.stack([z, c], 2).reshape(rows, -1).numpy(), 6)
    zd = z.double()
    row_max = zd.max(1).values
    sum_exp = torch.exp(zd - row_max[:, None]).sum(1)
    nontarget = torch.exp(zd[:, 1:] - row_max[:, None]).sum(1)  # the harness's target is class 0
    assert torch.equal(out[:, 0].double(), row_max)
    assert ((out[:, 1].double() - sum_exp).abs() <= 1e-5 * sum_exp).all()
    assert ((out[:, 2].double() - nontarget).abs() <= 1e-5 * nontarget).all()
    assert ((out[:, 3].double() - zd.sum(1)).abs() <= 1e-5 * zd.abs().sum(1)).all()
    best, best_class = c.max(1)  # torch.max returns the first maximal index
    assert torch.equal(out[:, 4], best)
    assert torch.equal(out[:, 5].long(), best_class)


@pytest.mark.parametrize("dim,vec", [(1, 1), (45, 1), (64, 4), (512, 4), (100, 4)])
def test_projection_matches_the_tangent_projection(harness, dim, vec):
    """csrc project_rows_kernel's math (row_math.cuh, the warp's order emulated by the harness):
    out = grad - (u . grad) u, u = f v (docs/design.md eqs. (23)-(24b)) to float32 accuracy, for rows
    where the projection removes most of grad (grad nearly along v) and rows where it removes
    little; rows of v in any dtype arrive as float32. The harness aborts unless every lane ends
    the butterfly with the same bits."""
    g = torch.Generator().manual_seed(3)
    rows = 64
    v = torch.randn(rows, dim, generator=g)
    factor = 1.0 / v.double().norm(dim=1)
    grad = torch.randn(rows, dim, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    grad[: rows // 2] += 40.0 * v[: rows // 2]  # mostly along v: the projection cancels it
    factor[-1] = 0.0  # a row clamped at eps (common.projection_factor): grad passes through
    records = torch.cat([factor[:, None].float(), grad, v], 1)
    out = harness(["project", dim, vec], records.numpy(), dim)
    unit = v.double() * factor[:, None]
    ref = grad.double() - (unit * grad.double()).sum(1, keepdim=True) * unit
    # float32 rounding of the dot (|grad| |u|) and of the products
    bound = 1e-6 * (grad.double().norm(dim=1) + unit.norm(dim=1) ** 2 * grad.double().norm(dim=1))[:, None] + 1e-30
    assert ((out.double() - ref).abs() <= bound).all()
    assert torch.equal(out[-1], grad[-1])
    # the cancelling rows keep only the part orthogonal to v
    assert ((out[: rows // 2].double() * v[: rows // 2].double()).sum(1).abs()
            <= 1e-4 * grad[: rows // 2].double().norm(dim=1) * v[: rows // 2].double().norm(dim=1)).all()


def test_projection_of_rows_of_any_norm(harness):
    """Rows of norm 2^-30 .. 2^127 with grad as a backward makes it (f times a vector of order 1,
    partly along v): f^2 underflows past 2^63, where the kernel forms the unit row per entry
    (eq. (24b)); each row against float64 to its own magnitude (a subnormal step below)."""
    g = torch.Generator().manual_seed(6)
    dim = 64
    exponents = torch.tensor([-30, 0, 40, 62, 63, 64, 70, 100, 120, 126, 127], dtype=torch.float64)
    v = torch.randn(len(exponents), dim, generator=g, dtype=torch.float64)
    v *= torch.exp2(exponents)[:, None] / v.norm(dim=1, keepdim=True)
    factor = 1.0 / v.norm(dim=1)
    grad = (torch.randn(v.shape, generator=g, dtype=torch.float64) + 3.0 * v * factor[:, None]) * factor[:, None]
    v, grad, factor = v.float(), grad.float(), factor.float()
    out = harness(["project", dim, 4], torch.cat([factor[:, None], grad, v], 1).numpy(), dim)
    unit = v.double() * factor.double()[:, None]
    ref = grad.double() - (unit * grad.double()).sum(1, keepdim=True) * unit
    bound = 1e-6 * grad.double().abs().amax(dim=1, keepdim=True) + 4 * 2.0**-149
    assert ((out.double() - ref).abs() <= bound).all(), ((out.double() - ref).abs() / bound).amax(dim=1)


def test_projection_pieces_change_only_the_dots_summation_order(harness):
    """Vector pieces (V = 4) and scalar pieces (V = 1) sum the row's products in different orders:
    the results agree to float32 accuracy, and with a dot of exact terms (small integers) bit for bit."""
    g = torch.Generator().manual_seed(4)
    dim = 128
    grad = torch.randint(-8, 8, (16, dim), generator=g).float()
    v = torch.randint(-8, 8, (16, dim), generator=g).float()
    factor = torch.full((16, 1), 2.0**-5)
    records = torch.cat([factor, grad, v], 1).numpy()
    assert torch.equal(harness(["project", dim, 4], records, dim), harness(["project", dim, 1], records, dim))


@pytest.mark.parametrize("k", [1, 3])
def test_routed_gradient_writes_only_the_winning_sub_centre(harness, k):
    g = torch.Generator().manual_seed(5)
    n = 200
    dcos, rx = torch.randn(n, generator=g) * 10, torch.rand(n, generator=g) + 0.5
    rw = torch.rand(n, k, generator=g) + 0.5
    pick = torch.randint(0, k, (n,), generator=g)
    out = harness(["route", k], torch.cat([dcos[:, None], rx[:, None], rw, pick[:, None].float()], 1).numpy(), k)
    ref = torch.zeros(n, k)
    ref[torch.arange(n), pick] = (dcos * rx * rw[torch.arange(n), pick])
    assert torch.equal(out, ref)


def test_forward_chunks_hold_a_multiple_of_64_classes(harness):
    """csrc/chunk_size.h: the float32 dots of a chunk within the workspace, a multiple of 64
    classes whenever 64 fit (so the dots' leading dimension is a multiple of 16 bytes), else what fits."""
    cases = [(4096, 1, 262144, 64 * 2**20), (1000, 1, 10**6, 2**24), (7, 3, 5000, 2**16), (512, 1, 40, 2**26),
             (4096, 1, 10**6, 4096 * 4 * 100), (4096, 2, 10**6, 4096 * 8 * 63), (1, 1, 1, 1)]
    out = harness(["chunk"], torch.tensor(cases, dtype=torch.float32).numpy(), 1)[:, 0].long().tolist()
    for (rows, k, classes, budget), chunk in zip(cases, out):
        fits = max(1, min(classes, budget // (4 * rows * k)))
        assert chunk <= fits and chunk * 4 * rows * k <= max(budget, 4 * rows * k)
        if fits >= 64:
            assert chunk % 64 == 0 and chunk > fits - 64
        else:
            assert chunk == fits
    assert out[:4] == [4096, 4160, 768, 40]  # 2^24 / 4000 = 4194 -> 4160; 2^16 / 84 = 780 -> 768


@pytest.mark.parametrize("m1", (1.0, 1.35))
def test_clipped_phi_matches_margins_py(harness, m1):
    """fallback="clip" (eq. (3a), the template flag of csrc/margin_math.cuh) against margins.phi: angles
    inside the bounds, and clipped at eps (a negative m2, AdaFace's g_ang, near theta = 0) and at
    pi - eps (past pi - m2)."""
    clipped_low = clipped_high = 0
    for m2 in (-0.3, 0.0, 0.5):
        for eps in (1e-3, 0.05):
            c = _cosine_grid(m1, abs(m2))
            angle = m1 * torch.acos(c.double().clamp(-1, 1)) + m2
            clipped_low += int((angle < eps).sum())
            clipped_high += int((angle > math.pi - eps).sum())
            flags = torch.tensor([m1, m2, 0.2, 0.0, eps]).expand(len(c), 5)
            out = harness(["margin_clip"], torch.cat([c[:, None], flags], 1).numpy(), 1)
            ref = phi(c, m1, m2, 0.2, False, clip=eps)
            bad = ~_close(out[:, 0], ref, _angle_slack(c, m1, m2))
            assert not bad.any(), (m2, eps, c[bad][:4].tolist(), out[bad, 0][:4].tolist())
    assert clipped_low > 10 and clipped_high > 10


@pytest.mark.parametrize("mode", ["curricular", "mv", "filter"])
@pytest.mark.parametrize("clip", [False, True])
def test_nontarget_epilogue_matches_negatives_py(harness, mode, clip):
    """The non-target epilogue's per-entry math (row_math.cuh: is_hard, mapped_cosine, map_slope and
    the remapped logit and gradient) against arcface_kernels/negatives.py: hard non-target entries
    (cos > tau) get z = s h(c) and dcos = s g (p - eps/C) dh/dc with p = exp(s h(c) - lse) (eqs.
    (N1)-(N2)); the others and the target (its phi, with the clip rule where asked) are unchanged;
    a row without a target has tau = +inf and nothing hard."""
    from arcface_kernels.negatives import coefficients, is_hard, map_cosines, map_slope

    g = torch.Generator().manual_seed(6)
    n = 20000
    c = torch.rand(n, generator=g) * 2 - 1
    is_target = torch.rand(n, generator=g) < 0.2
    tau = torch.rand(n, generator=g) * 1.6 - 0.8
    tau[:500] = math.inf
    t = {"curricular": 0.3, "mv": 1.12, "filter": 0.2}[mode]
    coeffs = coefficients(mode, torch.tensor(t, dtype=torch.float32))
    m1 = torch.tensor(M1S)[torch.randint(0, 4, (n,), generator=g)]
    m2 = torch.rand(n, generator=g) * 0.5
    m3 = torch.rand(n, generator=g) * 0.35
    scale, eps_c, clip_eps = 64.0, 0.1 / 1000, 0.05
    hard = is_hard(c[:, None], tau, is_target[:, None])[:, 0]
    mapped, slope = map_cosines(c, hard, coeffs), map_slope(c, hard, coeffs)
    # an lse at or above the entry's logit (as the row's is): p from tiny to 1
    lse = scale * (torch.maximum(c, mapped) + torch.rand(n, generator=g) * 1.2)
    grad = torch.rand(n, generator=g)
    target_dcos = torch.randn(n, generator=g) * 100
    full = torch.full_like
    records = torch.stack([c, is_target.float(), tau, *(full(c, float(v)) for v in coeffs), m1, m2, m3, lse, grad,
                           target_dcos, full(c, scale), full(c, eps_c), torch.zeros_like(c), full(c, clip_eps)], 1)
    out = harness(["nontarget", int(clip)], records.numpy(), 2)
    assert 0.2 < hard.float().mean() < 0.6 and not hard[:500].any()
    margined = phi(c, m1, m2, m3, False, clip=clip_eps if clip else None)
    ref_z = scale * torch.where(is_target, margined, mapped)
    p = torch.exp(scale * mapped.double() - lse.double())
    ref_dcos = torch.where(is_target, target_dcos.double(), scale * grad.double() * (p - eps_c) * slope.double())
    keep = clip | ~_near_branch(c, m1, m2)
    assert keep.sum() > n - 10
    assert _close(out[keep, 0] / scale, ref_z[keep] / scale, _angle_slack(c, m1, m2)[keep]).all()
    assert torch.equal(out[is_target, 1], target_dcos[is_target])
    assert torch.equal(out[~hard & ~is_target, 0], scale * c[~hard & ~is_target])
    # h(c) rounded in float32 (a fused multiply-add on the device, not on the host) moves s h by a
    # few ulps of s: p by about s 2^-22 relative
    slack = scale * 2.0**-22 * (scale * grad.double() * p * slope.double().abs())
    bad = (out[:, 1].double() - ref_dcos).abs() > TOL * ref_dcos.abs().clamp_min(1.0) + slack
    assert not bad.any(), (c[bad][:4].tolist(), out[bad, 1][:4].tolist(), ref_dcos[bad][:4].tolist())
    if mode == "filter":  # hard entries carry no gradient at all
        assert (out[hard, 1] == 0).all()
