"""compat.pml: PML's interface on the fused op, checked against pytorch-metric-learning itself;
from_pml / to_pml honour or refuse every setting."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from spawn import run_ranks

import arcface_kernels as ak
from helpers import rel_err

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402
from pytorch_metric_learning.utils import distributed as pml_dist  # noqa: E402

from arcface_kernels import compat  # noqa: E402
from arcface_kernels.compat import pml as cpml  # noqa: E402
from arcface_kernels.distributed import ShardedMarginLoss  # noqa: E402

N, C, D = 12, 7, 5

# (ours, PML's, constructor arguments, sub-centres per class); margins in PML's units.
PAIRS = [
    (cpml.ArcFaceLoss, pml_losses.ArcFaceLoss, dict(num_classes=C, embedding_size=D), 1),
    (cpml.ArcFaceLoss, pml_losses.ArcFaceLoss, dict(num_classes=C, embedding_size=D, margin=40.0, scale=10), 1),
    (cpml.CosFaceLoss, pml_losses.CosFaceLoss, dict(num_classes=C, embedding_size=D, margin=0.25, scale=30), 1),
    (cpml.SubCenterArcFaceLoss, pml_losses.SubCenterArcFaceLoss,
     dict(num_classes=C, embedding_size=D, margin=20.0, scale=16, sub_centers=3), 3),
]


def test_pml_is_imported_only_when_used():
    probe = ("import sys; import arcface_kernels, arcface_kernels.compat; "
             "assert 'pytorch_metric_learning' not in sys.modules; "
             "sys.modules['pytorch_metric_learning'] = None; "      # as if it were not installed
             "from arcface_kernels import compat\n"
             "try: compat.from_pml\n"
             "except ImportError as e: assert 'pip install pytorch-metric-learning' in str(e), e\n"
             "else: raise AssertionError('no ImportError')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _twins(case, backend="auto", **extra):
    """Our loss and PML's with the same (float64) W."""
    ours_cls, pml_cls, kwargs, k = PAIRS[case]
    torch.manual_seed(case)
    ours = ours_cls(**kwargs, backend=backend, **copy.deepcopy(extra))
    pml = pml_cls(**kwargs, **extra)
    ours.W.data = ours.W.data.double()
    pml.W.data = ours.W.data.clone()
    return ours, pml, k


def _batch(w, k, seed=0, dtype=torch.float64):
    """Rows and labels; row 0 points almost opposite to its target, past pi - margin."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    x[0] = -w[:, y[0] * k] + 0.05 * torch.randn(D, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def _loss_and_grads(loss_fn, x, *args, **kwargs):
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x, *args, **kwargs)
    dx, dw = torch.autograd.grad(loss, [x, getattr(loss_fn, "loss", loss_fn).W])   # .loss: a wrapper
    return loss.detach(), dx, dw


def _assert_same(ours, pml, x, *args, tol=1e-12, **kwargs):
    ref = _loss_and_grads(pml, x, *args, **kwargs)
    got = _loss_and_grads(ours, x, *args, **kwargs)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("case", range(len(PAIRS)))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_loss_and_gradients_equal_pml(case, backend):
    ours, pml, k = _twins(case, backend=backend)
    x, y = _batch(pml.W.data, k)
    if k == 1 and isinstance(pml, pml_losses.ArcFaceLoss):   # PML's rule past pi - m is exercised
        cos0 = torch.nn.functional.cosine_similarity(x[0], pml.W.data[:, y[0]], dim=0)
        assert math.acos(cos0) > math.pi - pml.margin
    _assert_same(ours, pml, x, y)


def test_the_loss_comes_from_the_fused_op():
    loss = cpml.ArcFaceLoss(C, D, backend="no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        loss(torch.randn(N, D), torch.randint(0, C, (N,)))


def test_pml_interface():
    ours = cpml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=2)
    assert isinstance(ours, pml_losses.SubCenterArcFaceLoss)
    assert isinstance(ours.W, torch.nn.Parameter) and ours.W.shape == (D, C * 2)
    assert list(ours.state_dict()) == ["W"]
    assert ours.margin == pytest.approx(math.radians(28.6)) and ours.scale == 64
    assert type(ours.distance) is distances.CosineSimilarity and type(ours.reducer) is reducers.MeanReducer
    arc = cpml.ArcFaceLoss(C, D, 30.0, 16)            # PML's positional margin (degrees) and scale
    assert arc.margin == pytest.approx(math.radians(30.0)) and arc.scale == 16
    init = cpml.CosFaceLoss(C, D, weight_init_func=lambda w: torch.nn.init.constant_(w, 0.5))
    assert torch.equal(init.W.data, torch.full((D, C), 0.5))


@pytest.mark.parametrize("case", [0, 2, 3])
def test_collect_stats_records_avg_angle(case):
    ours, pml, k = _twins(case, collect_stats=True)
    x, y = _batch(pml.W.data, k, seed=16)
    ours(x, y), pml(x, y)
    assert ours.avg_angle == pytest.approx(pml.avg_angle, rel=1e-12) and 0 < ours.avg_angle < 180


def test_pml_checkpoint_loads():
    ours, pml, k = _twins(3)
    pml.W.data = torch.randn_like(pml.W.data)
    ours.load_state_dict(pml.state_dict())
    assert torch.equal(ours.W.data, pml.W.data)
    _assert_same(ours, pml, *_batch(pml.W.data, k, seed=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtypes_as_pml(dtype):
    """PML casts W to the embeddings' dtype in every forward and returns the loss in that dtype;
    ours does too, with the per-row losses from the fused op and reduced in float32: float16's
    loss is the float64 loss (on the same float16 operands) correctly rounded."""
    torch.manual_seed(3)
    ours = cpml.ArcFaceLoss(C, D, scale=16)
    pml = pml_losses.ArcFaceLoss(C, D, scale=16)
    pml.W.data = ours.W.data.clone()
    x, y = _batch(ours.W.data.double(), 1, seed=3, dtype=dtype)
    truth = pml_losses.ArcFaceLoss(C, D, scale=16)
    truth.W.data = ours.W.data.to(dtype).double()        # the operands both losses compute with
    want = truth(x.double(), y)
    got, ref = ours(x, y), pml(x, y)
    assert got.dtype == ref.dtype == dtype and ours.W.dtype == pml.W.dtype == dtype
    if dtype == torch.float16:
        assert got == want.half()
    else:
        assert rel_err(got, want) < {torch.float32: 1e-6, torch.float64: 1e-13}[dtype]


def test_autocast_as_pml():
    """Under autocast PML's loss is float32 (its cross-entropy autocasts) and W follows PML's
    cast_types; so do ours, within bf16 rounding of PML's value."""
    ours = cpml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, scale=16)
    pml = pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, scale=16)
    pml.W.data = ours.W.data.clone()
    x, y = _batch(ours.W.data.double(), 3, seed=15, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = ours(x, y), pml(x, y)
    assert got.dtype == ref.dtype == torch.float32 and ours.W.dtype == pml.W.dtype
    assert rel_err(got, ref) < 2e-2


def test_errors_as_pml():
    loss = cpml.ArcFaceLoss(C, D)
    x, y = torch.randn(N, D), torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match="labels are required"):
        loss(x)
    with pytest.raises(ValueError, match="labels are required"):
        loss(x, indices_tuple=miners.MultiSimilarityMiner()(x, y))
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        loss(x, y, ref_emb=x.clone())
    with pytest.raises(ValueError, match="Number of embeddings must equal"):
        loss(x, y[:-1])
    with pytest.raises(ValueError, match="no ignore_index"):
        loss(x, torch.where(y == y[0], -100, y))


@pytest.mark.parametrize("distance", [distances.CosineSimilarity(power=2), distances.CosineSimilarity(p=1),
                                      distances.LpDistance(), distances.DotProductSimilarity()])
def test_distances_the_op_cannot_honour_are_refused(distance):
    with pytest.raises(ValueError, match="CosineSimilarity"):
        cpml.ArcFaceLoss(C, D, distance=distance)
    loss = cpml.CosFaceLoss(C, D)
    loss.distance = distance
    with pytest.raises(ValueError, match="CosineSimilarity"):
        loss(torch.randn(N, D), torch.randint(0, C, (N,)))
    with pytest.raises(ValueError, match="CosineSimilarity"):
        compat.from_pml(loss)


def test_margins_outside_the_op_are_refused_in_pml_units():
    with pytest.raises(ValueError, match="below 90 degrees, got 95"):
        cpml.ArcFaceLoss(C, D, margin=95)
    with pytest.raises(ValueError, match=r"\(-1, 1\)"):
        cpml.CosFaceLoss(C, D, margin=1.5)


@pytest.mark.parametrize("reducer", [reducers.MeanReducer(), reducers.SumReducer(), reducers.AvgNonZeroReducer(),
                                     reducers.ThresholdReducer(low=1.0), reducers.ClassWeightedReducer(
                                         torch.linspace(0.5, 2.0, C, dtype=torch.float64))])
def test_reducers(reducer):
    ours, pml, k = _twins(0, reducer=reducer)
    _assert_same(ours, pml, *_batch(pml.W.data, k, seed=4))


def test_regularizers():
    reg = dict(weight_regularizer=regularizers.RegularFaceRegularizer(), weight_reg_weight=0.3,
               embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.1)
    ours, pml, k = _twins(3, **reg)
    assert ours.sub_loss_names() == pml.sub_loss_names() == ["loss", "weight_reg_loss", "embedding_reg_loss"]
    _assert_same(ours, pml, *_batch(pml.W.data, k, seed=5))


@pytest.mark.parametrize("case", [0, 3])
def test_miner_weights(case):
    ours, pml, k = _twins(case)
    x, y = _batch(pml.W.data, k, seed=6)
    # anchors, positives, negatives as a miner returns them: rows counted 0, 1, 2 or 3 times
    triplets = (torch.tensor([0, 0, 1]), torch.tensor([2, 2, 3]), torch.tensor([4, 5, 0]))
    _assert_same(ours, pml, x, y, triplets)
    unweighted = _loss_and_grads(ours, x, y)[0]
    assert rel_err(_loss_and_grads(ours, x, y, triplets)[0], unweighted) > 1e-3


def test_multiple_losses_with_miners():
    ours, pml, k = _twins(0)
    ours_cos, pml_cos, _ = _twins(2)
    mined = [miners.MultiSimilarityMiner(), None]
    both_ours = pml_losses.MultipleLosses([ours, ours_cos], miners=mined, weights=[1.0, 0.5])
    both_pml = pml_losses.MultipleLosses([pml, pml_cos], miners=mined, weights=[1.0, 0.5])
    x, y = _batch(pml.W.data, k, seed=7)
    torch.testing.assert_close(both_ours(x, y), both_pml(x, y), rtol=1e-12, atol=0)


def test_get_logits_and_get_outliers_as_pml():
    ours, pml, k = _twins(3)
    x, y = _batch(pml.W.data, k, seed=8, dtype=torch.float16)
    w = ours.W.data.clone()
    logits = ours.get_logits(x)
    assert logits.shape == (N, C) and logits.dtype == torch.float16
    assert torch.equal(ours.W.data, w)                                # W itself is not cast here
    pml.W.data = pml.W.data.half()
    assert torch.equal(logits, pml.get_logits(x))                     # PML's arithmetic, bit for bit
    ours.W.data = pml.W.data.clone()
    counts = set()
    for threshold in (45, 75, 120):                                   # degrees
        outliers, centres = ours.get_outliers(x, y, threshold=threshold)
        ref_outliers, ref_centres = pml.get_outliers(x, y, threshold=threshold)
        present = torch.unique(y)                                     # PML leaves the others uninitialized
        assert torch.equal(outliers, ref_outliers) and torch.equal(centres[:, present], ref_centres[:, present])
        assert centres.shape == (D, C)
        counts.add(outliers.numel())
    assert len(counts) == 3


def test_distributed_loss_wrapper_single_process():
    ours, pml, k = _twins(1)
    x, y = _batch(pml.W.data, k, seed=9)
    with pytest.warns(UserWarning, match="non-distributed"):
        got = pml_dist.DistributedLossWrapper(ours)(x, y)
    torch.testing.assert_close(got, pml(x, y), rtol=1e-12, atol=0)


def _wrapped_on_ranks(rank, world):
    ours, pml, k = _twins(3)
    x, y = _batch(pml.W.data, k, seed=10 + rank)
    _assert_same(pml_dist.DistributedLossWrapper(ours), pml_dist.DistributedLossWrapper(pml), x, y)


@pytest.mark.slow
def test_distributed_loss_wrapper_two_ranks():
    run_ranks(_wrapped_on_ranks, 2)


# -- from_pml / to_pml ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(PAIRS)))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_from_pml_equals_pml(case, backend):
    _, pml, k = _twins(case)
    head = compat.from_pml(pml, backend=backend)
    assert head.weight.shape == (C * k, D) and head.weight.dtype == torch.float64
    x, y = _batch(pml.W.data, k, seed=11)
    ref_loss, ref_dx, ref_dw = _loss_and_grads(pml, x, y)
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    dx, dw = torch.autograd.grad(loss, [x, head.weight])
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(dx, ref_dx) < 1e-10 and rel_err(dw, ref_dw.T) < 1e-10


def test_from_pml_honours_the_reducer():
    _, pml, k = _twins(0, reducer=reducers.SumReducer())
    head = compat.from_pml(pml)
    assert head.options.reduction == "sum"
    x, y = _batch(pml.W.data, k, seed=12)
    torch.testing.assert_close(head(x, y), pml(x, y), rtol=1e-12, atol=0)


@pytest.mark.parametrize("setting, match", [
    (dict(reducer=reducers.AvgNonZeroReducer()), "AvgNonZeroReducer"),
    (dict(weight_regularizer=regularizers.RegularFaceRegularizer()), "weight_regularizer"),
    (dict(embedding_regularizer=regularizers.LpRegularizer()), "embedding_regularizer"),
])
def test_from_pml_refuses(setting, match):
    for loss_class in (pml_losses.ArcFaceLoss, cpml.ArcFaceLoss):
        with pytest.raises(ValueError, match=match):
            compat.from_pml(loss_class(C, D, **setting))
    with pytest.raises(TypeError, match="from_pml takes"):
        compat.from_pml(pml_losses.LargeMarginSoftmaxLoss(C, D))


@pytest.mark.parametrize("head, match", [
    (lambda: ak.ArcFaceLoss(C, D, ignore_index=3), "ignore_index"),
    (lambda: ak.ArcFaceLoss(C, D, label_smoothing=0.1), "label_smoothing"),
    (lambda: ak.ArcFaceLoss(C, D, margin_grad="straight_through"), "margin_grad"),
    (lambda: ak.ArcFaceLoss(C, D, reduction="none"), "reduction='none'"),
    (lambda: ak.ArcFaceLoss(C, D, sample_rate=0.5), "Partial FC"),
    (lambda: ak.SphereFaceLoss(C, D), "m1 != 1"),
    (lambda: ak.CombinedMarginLoss(C, D, m2=0.2, m3=0.1), "m2=0.2, m3=0.1"),
])
def test_to_pml_refuses_what_pml_cannot_express(head, match):
    with pytest.raises(ValueError, match=match):
        compat.to_pml(head())


def _to_pml_of_a_shard(rank, world):
    head = ShardedMarginLoss(C, D)
    with pytest.raises(ValueError, match="a shard"):
        compat.to_pml(head)


@pytest.mark.slow
def test_to_pml_refuses_a_shard():
    run_ranks(_to_pml_of_a_shard, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_to_pml_round_trip(fused):
    head = ak.SubCenterArcFaceLoss(C, D, margin=0.3, scale=20.0, reduction="sum", dtype=torch.float64)
    pml = compat.to_pml(head, fused=fused)
    assert type(pml) is (cpml.SubCenterArcFaceLoss if fused else pml_losses.SubCenterArcFaceLoss)
    assert pml.margin == 0.3 and type(pml.reducer) is reducers.SumReducer
    assert pml.W.shape == (D, C * 3) and torch.equal(pml.W.data, head.weight.data.T)
    back = compat.from_pml(pml)
    assert torch.equal(back.weight, head.weight) and back.options.m2 == 0.3 and back.options.reduction == "sum"
    x, y = _batch(pml.W.data, 3, seed=13)
    torch.testing.assert_close(back(x, y), pml(x, y), rtol=1e-12, atol=0)


def test_checkpoint_round_trip_through_the_fused_head():
    """The README's path: a PML state_dict -> compat.pml -> fused head -> PML again."""
    torch.manual_seed(0)
    trained = pml_losses.ArcFaceLoss(C, D, margin=25.0)
    state = trained.state_dict()
    dropin = cpml.ArcFaceLoss(C, D, margin=25.0)
    dropin.load_state_dict(state)
    head = compat.from_pml(dropin)
    again = compat.to_pml(head)
    assert torch.equal(again.state_dict()["W"], state["W"])
    x, y = _batch(state["W"].double(), 1, seed=14, dtype=torch.float32)
    torch.testing.assert_close(head(x, y), trained(x, y), rtol=1e-5, atol=0)
