"""Every fused backend available on the test device (conftest.py) against the float64
reference: loss and both gradients on every contract option, odd sizes and extreme angles
(docs/design.md sections 2-3). A small torch-backend workspace makes it walk several class chunks."""

import pytest
import torch

import arcface_kernels as ak
from conftest import DEVICE
from helpers import TOL, assert_matches_reference, loss_and_grads, make_problem, reference64, rel_err


def make_problem_on(*args, **kwargs):
    return make_problem(*args, device=DEVICE, **kwargs)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A small workspace so that every test walks several class chunks.
SMALL_BUDGET = 6 * 1024


@pytest.fixture(autouse=True)
def small_chunks():
    with ak.workspace_budget(SMALL_BUDGET):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,d,k", [(5, 37, 19, 1), (7, 23, 8, 3), (1, 1, 3, 1), (4, 1, 5, 2), (33, 65, 17, 1)])
def test_odd_shapes_and_sub_centers(dtype, n, c, d, k, backend):
    x, w, y = make_problem_on(n, c, d, k=k, dtype=dtype, seed=n + c)
    assert_matches_reference(x, w, y, backend, sub_centers=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(m1=1.0, m2=0.0, m3=0.35),                      # CosFace
        dict(m1=1.35, m2=0.0, m3=0.0),                      # SphereFace
        dict(m1=1.1, m2=0.3, m3=0.1),                       # combined
        dict(m1=1.0, m2=0.0, m3=0.0),                       # plain normalized softmax
        dict(easy_margin=True),
        dict(margin_grad="straight_through"),
        dict(label_smoothing=0.1),
        dict(reduction="sum"),
        dict(reduction="none", label_smoothing=0.2, sub_centers=2),
        dict(scale=30.0, m2=1.2),                           # large margin: many rows past pi
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_contract_options(dtype, options, backend):
    k = options.get("sub_centers", 1)
    x, w, y = make_problem_on(9, 29, 11, k=k, dtype=dtype, seed=1, ignore=(4,))
    assert_matches_reference(x, w, y, backend, **options)


def test_per_row_margin_tensors(backend):
    x, w, y = make_problem_on(8, 21, 10, seed=2)
    g = torch.Generator().manual_seed(5)
    margins = dict(m1=1.0 + 0.5 * torch.rand(8, generator=g), m2=torch.rand(8, generator=g),
                   m3=0.3 * torch.rand(8, generator=g))
    margins = {name: m.to(DEVICE) for name, m in margins.items()}
    assert_matches_reference(x, w, y, backend, **margins)
    # A per-row tensor that repeats a float gives the float's result.
    same = ak.margin_softmax_loss(x, w, y, m2=torch.full((8,), 0.4, device=DEVICE), backend=backend)
    assert torch.equal(same, ak.margin_softmax_loss(x, w, y, m2=0.4, backend=backend))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 0.0, 0.35), (2.0, 0.5, 0.1)])
def test_extreme_angles(dtype, m1, m2, m3, backend):
    x, w, y = make_problem_on(8, 13, 6, dtype=torch.float64, seed=7)
    x[0] = w[y[0]] * 3.0            # parallel to its centre: theta = 0
    x[1] = -w[y[1]] * 0.5           # anti-parallel: theta = pi, past pi - m2
    x[4] = w[y[4]] + 1e-3 * w[(y[4] + 1) % 13]   # nearly parallel
    x, w = x.to(dtype), w.to(dtype)
    # At c within rounding of +-1, dphi/dc ~ 1/sin(theta) amplifies the input rounding.
    assert_matches_reference(x, w, y, backend, tol=max(TOL[dtype], 5e-3), m1=m1, m2=m2, m3=m3)


@pytest.mark.parametrize("dtype", DTYPES)
# float16's overflow to inf is the rule under test (the interpreter's numpy casts warn about it)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_zero_vectors_give_finite_results(dtype, backend):
    x, w, y = make_problem_on(5, 9, 6, seed=12)
    x[2] = 0.0                      # zero embedding: cos = 0 everywhere
    w[y[3]] = 0.0                   # zero class centre
    x, w = x.to(dtype), w.to(dtype)
    loss, dx, dw = loss_and_grads(x, w, y, backend=backend, reduction="none")
    if dtype != torch.float16:
        for t in (loss, dx, dw):
            assert torch.isfinite(t).all()
        assert_matches_reference(x, w, y, backend, reduction="none")
        return
    # A zero vector's gradient carries 1 / NORM_EPS (as through F.normalize), beyond float16: it
    # overflows to inf, exactly as a cast would, never clamped to 65504 (docs/design.md section 2).
    assert torch.isinf(dx[2]).any() and torch.isinf(dw[y[3]]).any()
    assert not (dx.abs() == torch.finfo(dtype).max).any() and not (dw.abs() == torch.finfo(dtype).max).any()
    ref = reference64(x, w, y, reduction="none")
    others, other_classes = torch.arange(5) != 2, torch.arange(9, device=DEVICE) != y[3]
    assert rel_err(loss, ref[0]) <= TOL[dtype]
    assert rel_err(dx[others], ref[1][others]) <= TOL[dtype]
    assert rel_err(dw[other_classes], ref[2][other_classes]) <= TOL[dtype]


def test_all_rows_ignored_gives_zero_loss_and_gradients(backend):
    x, w, y = make_problem_on(4, 7, 5, seed=3, ignore=range(4))
    for reduction in ("mean", "sum", "none"):
        loss, dx, dw = loss_and_grads(x, w, y, backend=backend, reduction=reduction)
        assert torch.all(loss == 0) and torch.all(dx == 0) and torch.all(dw == 0)


def test_ignore_index_that_is_a_class_number(backend):
    x, w, y = make_problem_on(6, 5, 4, seed=4)
    y[2] = 3
    assert_matches_reference(x, w, y, backend, ignore_index=3)


def test_stats_match_reference(backend):
    x, w, y = make_problem_on(11, 40, 9, k=2, seed=5, ignore=(3,))
    loss, stats = ak.margin_softmax_loss(x, w, y, sub_centers=2, return_stats=True, backend=backend)
    ref_loss, ref = ak.margin_softmax_loss(x.double(), w.double(), y, sub_centers=2, return_stats=True,
                                           backend="reference")
    assert rel_err(stats.lse, ref.lse) < 1e-6
    assert rel_err(stats.target_cos, ref.target_cos) < 1e-6
    assert torch.equal(stats.top1, ref.top1)
    assert stats.target_cos[3] == 0


def test_top1_ties_go_to_the_lowest_class(backend):
    x = torch.tensor([[1.0, 0.0]], device=DEVICE)
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]], device=DEVICE)
    y = torch.tensor([0], device=DEVICE)
    _, stats = ak.margin_softmax_loss(x, w, y, return_stats=True, backend=backend)
    assert stats.top1.tolist() == [1]


def test_non_contiguous_inputs(backend):
    x, w, y = make_problem_on(6, 17, 10, seed=6)
    xt = torch.cat([x, x], dim=1)[:, : x.shape[1]]
    wt = w.T.contiguous().T
    assert not xt.is_contiguous() and not wt.is_contiguous()
    a = loss_and_grads(xt, wt, y, backend=backend)
    b = loss_and_grads(x, w, y, backend=backend)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_deterministic_bits(backend):
    x, w, y = make_problem_on(12, 50, 16, k=2, seed=10)
    first = loss_and_grads(x, w, y, backend=backend, sub_centers=2, label_smoothing=0.1)
    for _ in range(2):
        again = loss_and_grads(x, w, y, backend=backend, sub_centers=2, label_smoothing=0.1)
        for u, v in zip(first, again):
            assert torch.equal(u, v)


# ---- inputs users really pass (issue 11): edge sizes, extreme values, per-row precision, ties ----

def _oracle_rows(x, w, y, **kwargs):
    from float64_oracle import oracle
    return oracle(x, w, y, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_well_classified_row_keeps_its_relative_precision(dtype, backend):
    # Rows near their own class axis: true losses of 2e-7 and below, which
    # lse - z_y would round to 0 or to one float32 step of lse (2e-6).
    c = d = 8
    w = torch.eye(c, d)
    y = torch.tensor([0, 3, 5, 7])
    x = w[y] + 0.25 * w[(y + 1) % c]
    for s in (21.0, 30.0):
        loss = ak.margin_softmax_loss(x.to(DEVICE, dtype), w.to(DEVICE, dtype), y.to(DEVICE), scale=s, m2=0.0,
                                      reduction="none", backend=backend)
        want, _, _ = _oracle_rows(x, w, y, scale=s, m2=0.0, reduction="none")
        assert want.max() < 5e-7
        assert ((loss.cpu().double() - want).abs() / want).max() < 1e-4


def _assert_matches_oracle(x, w, y, backend, tol, **kwargs):
    """Loss, dX and dW against the independent float64 formula (tests/float64_oracle.py)."""
    reduction = kwargs.get("reduction", "mean")
    oracle_kwargs = {name: kwargs[name] for name in ("scale", "m1", "m2", "m3") if name in kwargs}
    out = loss_and_grads(x, w, y, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64) if reduction == "none" else None
    ref = _oracle_rows(x.cpu(), w.cpu(), y.cpu(), k=kwargs.get("sub_centers", 1), reduction=reduction,
                       row_weights=weights, **oracle_kwargs)
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        assert o.dtype == (x.dtype if name == "dX" else w.dtype if name == "dW" else o.dtype)
        err = rel_err(o.cpu(), r)
        assert err <= tol, f"{backend} {name}: relative error {err:.3g} > {tol:.1g}"


@pytest.mark.parametrize("n,c,d", [(0, 7, 5), (1, 7, 5), (6, 1, 5), (6, 7, 1), (1, 1, 1)])
def test_edge_sizes_match_the_float64_formula(n, c, d, backend):
    x, w, y = make_problem_on(n, c, d, seed=n + c + d)
    for reduction in ("mean", "sum", "none"):
        # CosFace margins: with D = 1 every cosine is +-1, where ArcFace's acos magnifies rounding
        # (test_weight_imprinting_parallel_rows)
        loss, dx, dw = loss_and_grads(x, w, y, backend=backend, reduction=reduction, scale=8.0, m2=0.0, m3=0.35)
        assert loss.shape == ((n,) if reduction == "none" else ())
        assert dx.shape == x.shape and dw.shape == w.shape
        if n == 0:
            assert torch.all(loss == 0) and torch.all(dw == 0)
        else:
            _assert_matches_oracle(x, w, y, backend, TOL[torch.float32], reduction=reduction, scale=8.0,
                                   m2=0.0, m3=0.35)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_huge_and_tiny_norms_match_the_float64_formula(dtype, backend):
    # Rows whose entries reach the dtype's largest value: no overflow in the squared norm nor in
    # the raw dot products; rows far below eps behave like F.normalize's (x / eps).
    x, w, y = make_problem(6, 9, 5, seed=1)
    x, w = x / x.abs().amax(1, keepdim=True), w / w.abs().amax(1, keepdim=True)
    big = torch.finfo(dtype).max * 0.99
    x[0] *= big
    w[2] *= big
    w[y[1]] *= big
    x[3] *= 1e-3 if dtype == torch.float16 else 1e-30   # float16 cannot hold the 1 / eps gradient of 1e-30
    x, w = x.to(dtype), w.to(dtype)
    _assert_matches_oracle(x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), backend, max(TOL[dtype], 5e-3), scale=8.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.35, 0.0, 0.0)])
def test_weight_imprinting_parallel_rows(dtype, m1, m2, m3, backend):
    # Every embedding exactly equal to its class centre (weight imprinting): d cos / dx = 0 on the
    # target, so the margin's slope must not turn rounding into a gradient. With m2 != 0 the
    # loss itself is ill-conditioned in c there: one rounding step of c = 1 is an angle of
    # sqrt(2 * 6e-8) = 3.5e-4 rad, so s * sin(m2) * 3.5e-4 = 1.3e-3 in a logit (the 5e-3 of
    # test_extreme_angles).
    x, w, y = make_problem(8, 16, 12, seed=4)
    x = w[y].clone()
    x, w = x.to(dtype), w.to(dtype)
    tol = TOL[dtype] if m2 == 0 else max(TOL[dtype], 5e-3)
    _assert_matches_oracle(x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), backend, tol, scale=8.0, m1=m1, m2=m2, m3=m3)


def test_predict_and_stats_top1_agree_on_ties(backend):
    # Exact ties (small integer entries: every dot product is exact): the lowest class wins,
    # within a chunk and across chunks (the small workspace puts every few classes in a new chunk).
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], device=DEVICE)
    base = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = torch.cat([base, base * 2.0, base, torch.zeros(40, 3)]).to(DEVICE)  # classes 1, 5 and 9 tie for row 0
    y = torch.tensor([0, 0, 0], device=DEVICE)
    _, stats = ak.margin_softmax_loss(x, w, y, return_stats=True, backend=backend)
    classes, cosines = ak.topk_classes(x, w, k=3)
    assert stats.top1.tolist() == [1, 2, 3]
    assert classes[:, 0].tolist() == [1, 2, 3]
    assert classes[0].tolist() == [1, 5, 9]
    assert torch.equal(cosines[0], torch.ones(3, device=DEVICE))
