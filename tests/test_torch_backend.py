"""The `torch` backend against the float64 reference: loss and both gradients on every
contract option, odd sizes and extreme angles (DESIGN.md section 2)."""

import pytest
import torch

import arcface_kernels as ak
from helpers import TOL, assert_matches_reference, loss_and_grads, make_problem, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A small workspace so that every test walks several class chunks.
SMALL_BUDGET = 6 * 1024


@pytest.fixture(autouse=True)
def small_chunks():
    with ak.workspace_budget(SMALL_BUDGET):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,d,k", [(5, 37, 19, 1), (7, 23, 8, 3), (1, 1, 3, 1), (4, 1, 5, 2), (33, 65, 17, 1)])
def test_odd_shapes_and_sub_centers(dtype, n, c, d, k):
    x, w, y = make_problem(n, c, d, k=k, dtype=dtype, seed=n + c)
    assert_matches_reference(x, w, y, "torch", sub_centers=k)


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
def test_contract_options(dtype, options):
    k = options.get("sub_centers", 1)
    x, w, y = make_problem(9, 29, 11, k=k, dtype=dtype, seed=1, ignore=(4,))
    assert_matches_reference(x, w, y, "torch", **options)


def test_per_row_margin_tensors():
    x, w, y = make_problem(8, 21, 10, seed=2)
    g = torch.Generator().manual_seed(5)
    margins = dict(m1=1.0 + 0.5 * torch.rand(8, generator=g), m2=torch.rand(8, generator=g),
                   m3=0.3 * torch.rand(8, generator=g))
    assert_matches_reference(x, w, y, "torch", **margins)
    # A per-row tensor that repeats a float gives the float's result.
    same = ak.margin_softmax_loss(x, w, y, m2=torch.full((8,), 0.4), backend="torch")
    assert torch.equal(same, ak.margin_softmax_loss(x, w, y, m2=0.4, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 0.0, 0.35), (2.0, 0.5, 0.1)])
def test_extreme_angles(dtype, m1, m2, m3):
    x, w, y = make_problem(8, 13, 6, dtype=torch.float64, seed=7)
    x[0] = w[y[0]] * 3.0            # parallel to its centre: theta = 0
    x[1] = -w[y[1]] * 0.5           # anti-parallel: theta = pi, past pi - m2
    x[4] = w[y[4]] + 1e-3 * w[(y[4] + 1) % 13]   # nearly parallel
    x, w = x.to(dtype), w.to(dtype)
    # At c within rounding of +-1, dphi/dc ~ 1/sin(theta) amplifies the input rounding.
    assert_matches_reference(x, w, y, "torch", tol=max(TOL[dtype], 5e-3), m1=m1, m2=m2, m3=m3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_vectors_give_finite_results(dtype):
    x, w, y = make_problem(5, 9, 6, seed=12)
    x[2] = 0.0                      # zero embedding: cos = 0 everywhere
    w[y[3]] = 0.0                   # zero class centre
    x, w = x.to(dtype), w.to(dtype)
    loss, dx, dw = loss_and_grads(x, w, y, backend="torch", reduction="none")
    for t in (loss, dx, dw):
        assert torch.isfinite(t).all()
    if dtype != torch.float16:  # the 1 / eps gradient of a zero vector saturates in float16
        assert_matches_reference(x, w, y, "torch", reduction="none")


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    x, w, y = make_problem(4, 7, 5, seed=3, ignore=range(4))
    for reduction in ("mean", "sum", "none"):
        loss, dx, dw = loss_and_grads(x, w, y, backend="torch", reduction=reduction)
        assert torch.all(loss == 0) and torch.all(dx == 0) and torch.all(dw == 0)


def test_ignore_index_that_is_a_class_number():
    x, w, y = make_problem(6, 5, 4, seed=4)
    y[2] = 3
    assert_matches_reference(x, w, y, "torch", ignore_index=3)


def test_stats_match_reference():
    x, w, y = make_problem(11, 40, 9, k=2, seed=5, ignore=(3,))
    loss, stats = ak.margin_softmax_loss(x, w, y, sub_centers=2, return_stats=True, backend="torch")
    ref_loss, ref = ak.margin_softmax_loss(x.double(), w.double(), y, sub_centers=2, return_stats=True,
                                           backend="reference")
    assert rel_err(stats.lse, ref.lse) < 1e-6
    assert rel_err(stats.target_cos, ref.target_cos) < 1e-6
    assert torch.equal(stats.top1, ref.top1)
    assert stats.target_cos[3] == 0


def test_top1_ties_go_to_the_lowest_class():
    x = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    _, stats = ak.margin_softmax_loss(x, w, torch.tensor([0]), return_stats=True, backend="torch")
    assert stats.top1.tolist() == [1]


def test_non_contiguous_inputs():
    x, w, y = make_problem(6, 17, 10, seed=6)
    xt = torch.cat([x, x], dim=1)[:, : x.shape[1]]
    wt = w.T.contiguous().T
    assert not xt.is_contiguous() and not wt.is_contiguous()
    a = loss_and_grads(xt, wt, y, backend="torch")
    b = loss_and_grads(x, w, y, backend="torch")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_chunking_does_not_change_the_result_beyond_rounding():
    x, w, y = make_problem(16, 300, 24, seed=8)
    small = loss_and_grads(x, w, y, backend="torch")
    with ak.workspace_budget(64 * 2**20):
        whole = loss_and_grads(x, w, y, backend="torch")
    for u, v in zip(small, whole):
        assert rel_err(u, v) < 1e-6


def test_gradcheck_float64():
    x, w, y = make_problem(4, 6, 5, k=2, dtype=torch.float64, seed=9, ignore=(1,))
    x.requires_grad_(True)
    w.requires_grad_(True)
    m3 = torch.tensor([0.1, 0.0, 0.2, 0.05], dtype=torch.float64)

    def f(x, w):
        return ak.margin_softmax_loss(x, w, y, scale=4.0, m1=1.2, m2=0.3, m3=m3, sub_centers=2,
                                      label_smoothing=0.1, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6)


def test_deterministic_bits():
    x, w, y = make_problem(12, 50, 16, k=2, seed=10)
    first = loss_and_grads(x, w, y, backend="torch", sub_centers=2, label_smoothing=0.1)
    for _ in range(2):
        again = loss_and_grads(x, w, y, backend="torch", sub_centers=2, label_smoothing=0.1)
        for u, v in zip(first, again):
            assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_both_inputs(dtype):
    x, w, y = make_problem(5, 9, 6, seed=11)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = ak.margin_softmax_loss(x, w, y, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = ak.margin_softmax_loss(x.to(dtype), w.detach().to(dtype), y, backend="torch")
    assert torch.equal(loss.detach(), ref)
