"""compat.from_insightface against a float64 transcription of insightface's arcface_torch
(losses.py CombinedMarginLoss, partial_fc_v2.py PartialFC_V2 / DistCrossEntropy / AllGather, as
of deepinsight/insightface 7fadd420), on 1 process and on 3 gloo processes; its PartialFC_V2
shard files in and out."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from authors_heads import combined_margin_filtered
from spawn import run_ranks

import arcface_kernels as ak
from arcface_kernels import compat
from helpers import rel_err

D = 5
NUM_CLASSES, ROWS_PER_RANK = 11, 4
PROB_FLOOR = 1e-30   # DistCrossEntropyFunc clamps the target probability here


# -- the transcription (float64; collectives only when a process group is up) -------------------

def _world():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def _all_reduce(t, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(t, op)
    return t


class _AllGather(torch.autograd.Function):
    """AllGatherFunc: every rank's rows; backward sums each rank's rows' gradients over the
    ranks and multiplies by the world size ("cooperate with distributed loss function")."""

    @staticmethod
    def forward(ctx, x):
        world, _ = _world()
        if world == 1:
            return x.clone()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        world, rank = _world()
        grad = _all_reduce(grad.clone())
        n = grad.shape[0] // world
        return grad[rank * n : (rank + 1) * n] * world


class _DistCrossEntropy(torch.autograd.Function):
    """DistCrossEntropyFunc: softmax over every rank's classes; the loss is the mean over the
    global batch of -log(max(p_target, 1e-30)); the backward, (softmax - one_hot) / N, ignores
    that floor."""

    @staticmethod
    def forward(ctx, logits, local_labels):
        top = _all_reduce(logits.max(dim=1, keepdim=True).values, dist.ReduceOp.MAX)
        e = (logits - top).exp()
        p = e / _all_reduce(e.sum(dim=1, keepdim=True))
        mine = torch.nonzero(local_labels >= 0).flatten()
        p_target = torch.zeros(logits.shape[0], dtype=logits.dtype)
        p_target[mine] = p[mine, local_labels[mine]]
        _all_reduce(p_target)
        ctx.save_for_backward(p, local_labels)
        return -p_target.clamp_min(PROB_FLOOR).log().mean()

    @staticmethod
    def backward(ctx, grad):
        p, local_labels = ctx.saved_tensors
        g = p.clone()
        mine = torch.nonzero(local_labels >= 0).flatten()
        g[mine, local_labels[mine]] -= 1.0
        return g / p.shape[0] * grad, None


def _combined_margin(cos, local_labels, s, m1, m2, m3):
    """CombinedMarginLoss.forward: ArcFace when m1 == 1 and m3 == 0, its angles changed in place
    under no_grad (the gradient passes through as if phi(c) = c); else CosFace with m3 when
    m3 > 0 (m1 and m2 unused); else it raises."""
    rows = torch.nonzero(local_labels >= 0).flatten()
    cols = local_labels[rows]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            angles = cos.acos()
            angles[rows, cols] += m2
        logits = cos + (angles.cos() - cos).detach()
    elif m3 > 0:
        logits = cos.index_put((rows, cols), cos[rows, cols] - m3)
    else:
        raise RuntimeError("insightface raises here")
    return logits * s


def _insightface_loss(weight_shard, class_start, x_local, y_local, s, margin_list):
    """PartialFC_V2.forward with sample_rate=1: the global batch's loss, the same on every rank."""
    world, _ = _world()
    x = _AllGather.apply(x_local)
    y = y_local
    if world > 1:
        parts = [torch.empty_like(y_local) for _ in range(world)]
        dist.all_gather(parts, y_local)
        y = torch.cat(parts)
    here = (y >= class_start) & (y < class_start + weight_shard.shape[0])
    local_labels = torch.where(here, y - class_start, -1)
    cos = F.linear(F.normalize(x), F.normalize(weight_shard)).clamp(-1, 1)
    return _DistCrossEntropy.apply(_combined_margin(cos, local_labels, s, *margin_list), local_labels)


# -- test problems --------------------------------------------------------------------------------

SCALE = 32.0
ARCFACE = (1.0, 0.5, 0.0)
# (margin_list, from_insightface keywords): every branch of CombinedMarginLoss
CASES = [
    (ARCFACE, {}),
    ((1.0, 0.0, 0.4), {}),        # CosFace
    ((0.9, 0.4, 0.15), {}),       # m3 > 0: insightface drops m1 and m2 (warned)
    ((1.0, 0.0, 0.0), {}),        # plain softmax through its ArcFace branch
]


def _problem(rows, seed=0):
    """Float64 class centres and rows near their targets: every target angle below pi - 0.5 and
    every row's loss below insightface's floor, so that parity is expected everywhere."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(NUM_CLASSES, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (rows,), generator=g)
    x = F.normalize(full[y], dim=1) + 0.7 * torch.randn(rows, D, generator=g, dtype=torch.float64)
    target_cos = F.cosine_similarity(x, full[y], dim=1)
    assert (target_cos > math.cos(math.pi - 0.5)).all()
    per_row = ak.margin_softmax_loss(x, full, y, scale=SCALE, m2=0.5, reduction="none")
    assert (per_row < -math.log(PROB_FLOOR)).all()
    return full, x, y


def _grads(loss, *tensors):
    return [loss.detach(), *torch.autograd.grad(loss, list(tensors))]


def _insightface_grads(full, x, y, margin_list, scale=SCALE):
    w, x = full.clone().requires_grad_(True), x.clone().requires_grad_(True)
    return _grads(_insightface_loss(w, 0, x, y, scale, margin_list), x, w)


def _head_grads(head, x, y):
    x = x.clone().requires_grad_(True)
    return _grads(head(x, y), x, head.weight)


def _assert_parity(got, ref):
    loss, dx, dw = got
    assert rel_err(loss, ref[0]) < 1e-12 and rel_err(dx, ref[1]) < 1e-10 and rel_err(dw, ref[2]) < 1e-10


@pytest.mark.parametrize("case", range(len(CASES)))
def test_parity_one_process(case):
    margin_list, options = CASES[case]
    full, x, y = _problem(3 * ROWS_PER_RANK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the warning has its own test
        head = compat.from_insightface(compat.reshard(full, 1), scale=SCALE, margin_list=margin_list,
                                       backend="torch", **options)
    _assert_parity(_head_grads(head, x, y), _insightface_grads(full, x, y, margin_list))


def _parity_on_ranks(rank, world, paths, full, x, y):
    """Each rank: insightface's loss (the global one) and gradients against the sharded head with
    global_loss, and against the single-device head on the concatenated batch."""
    warnings.simplefilter("ignore")
    start, num_local = _insightface_split(NUM_CLASSES, world)[rank]
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    for margin_list, options in CASES:
        w = full[start : start + num_local].clone().requires_grad_(True)
        x_local = x[rows].clone().requires_grad_(True)
        ref = _grads(_insightface_loss(w, start, x_local, y[rows], SCALE, margin_list), x_local, w)
        sharded = compat.from_insightface(paths, sharded=True, scale=SCALE, margin_list=margin_list,
                                          backend="torch", **options)
        x_local = x[rows].clone().requires_grad_(True)
        _assert_parity(_grads(compat.global_loss(sharded(x_local, y[rows])), x_local, sharded.weight), ref)
        single = compat.from_insightface(paths, scale=SCALE, margin_list=margin_list, backend="torch", **options)
        loss, dx, dw = _head_grads(single, x, y)
        # insightface's embedding gradient is world x that of the global mean (DDP then averages)
        _assert_parity((loss, dx[rows] * world, dw[start : start + num_local]), ref)


@pytest.mark.slow
def test_parity_three_ranks(tmp_path):
    full, x, y = _problem(3 * ROWS_PER_RANK, seed=1)
    paths = [str(p) for p in _write_insightface_files(tmp_path, full, 3, checkpoint=True)]
    run_ranks(_parity_on_ranks, 3, paths, full, x, y)


def test_exact_margin_gradient_on_request():
    full, x, y = _problem(3 * ROWS_PER_RANK, seed=2)
    head = compat.from_insightface([{"weight": full}], scale=SCALE, margin_grad="exact", backend="torch")
    loss, dx, dw = _head_grads(head, x, y)
    ref = _insightface_grads(full, x, y, ARCFACE)
    assert rel_err(loss, ref[0]) < 1e-12 and rel_err(dx, ref[1]) > 1e-2
    exact = _grads(ak.margin_softmax_loss(xx := x.clone().requires_grad_(True), ww := full.clone().requires_grad_(True),
                                          y, scale=SCALE, m2=0.5), xx, ww)
    _assert_parity((loss, dx, dw), exact)


def test_margin_list_semantics():
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the branches insightface computes as written: no warning
        assert compat.insightface_margins(ARCFACE) == ARCFACE
        assert compat.insightface_margins((1.0, 0.0, 0.4)) == (1.0, 0.0, 0.4)
    with pytest.warns(UserWarning, match="ignores m1=0.9 and m2=0.4 when m3 > 0"):
        assert compat.insightface_margins((0.9, 0.4, 0.15)) == (1.0, 0.0, 0.15)
    for raising in [(0.9, 0.4, 0.0), (1.0, 0.5, -0.1)]:
        with pytest.raises(ValueError, match="raises for margin_list"):
            compat.insightface_margins(raising)
    with pytest.raises(ValueError, match="margins must be one of"):
        compat.insightface_margins(ARCFACE, "pml")
    full, x, y = _problem(6, seed=3)
    head = compat.from_insightface([{"weight": full}], scale=SCALE, margin_list=(0.9, 0.4, 0.15), margins="combined",
                                   margin_grad="exact", backend="torch")
    want = ak.margin_softmax_loss(x, full, y, scale=SCALE, m1=0.9, m2=0.4, m3=0.15)
    torch.testing.assert_close(head(x, y), want, rtol=1e-12, atol=0)


def _lonely_row_problem(angle):
    """4 rows; row 0's target class and a distractor class are nobody else's."""
    full, x, y = _problem(4, seed=4)
    free = [c for c in range(NUM_CLASSES) if c not in y.tolist()]
    y[0] = free[0]
    u = F.normalize(x[0], dim=0)
    v = torch.randn(D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = F.normalize(v - (v @ u) * u, dim=0)
    full[free[1]] = u                                          # row 0 sits on the distractor's centre
    full[free[0]] = u * math.cos(angle) + v * math.sin(angle)  # its target centre `angle` away
    return full, x, y


def test_loss_floor_not_reproduced():
    """insightface reports -log(1e-30) = 69.08 for a row whose target probability is below 1e-30;
    the head reports the true value. Its backward ignores the floor: same gradients."""
    full, x, y = _lonely_row_problem(2.0)
    head = compat.from_insightface([{"weight": full}], backend="torch")
    got = _head_grads(head, x, y)
    ref = _insightface_grads(full, x, y, ARCFACE, scale=64.0)
    row0 = ak.margin_softmax_loss(x[:1], full, y[:1], scale=64.0, m2=0.5)
    assert row0 > 100
    torch.testing.assert_close(got[0] - ref[0], (row0 + math.log(PROB_FLOOR)) / 4, rtol=1e-12, atol=0)
    assert rel_err(got[1], ref[1]) < 1e-10 and rel_err(got[2], ref[2]) < 1e-10


def test_past_pi_minus_margin_not_reproduced():
    """Past theta = pi - m2 insightface's target logit is cos(theta + m2) as is, where the head
    follows the monotone rule cos(theta) - m2 sin(m2) (docs/design.md eq. 3): the same loss with
    that row's margin rewritten as m3 = cos(theta) - cos(theta + m2) reproduces insightface's."""
    angle = 3.0
    full, x, y = _lonely_row_problem(angle)
    head = compat.from_insightface([{"weight": full}], scale=SCALE, backend="torch")
    got = _head_grads(head, x, y)
    ref = _insightface_grads(full, x, y, ARCFACE)
    assert rel_err(got[0], ref[0]) > 1e-2
    m2 = torch.tensor([0.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    m3 = torch.tensor([math.cos(angle) - math.cos(angle + 0.5), 0, 0, 0], dtype=torch.float64)
    xx, ww = x.clone().requires_grad_(True), full.clone().requires_grad_(True)
    rewritten = _grads(ak.margin_softmax_loss(xx, ww, y, scale=SCALE, m2=m2, m3=m3, margin_grad="straight_through"),
                       xx, ww)
    assert rel_err(rewritten[0], ref[0]) < 1e-12 and rel_err(rewritten[1], ref[1]) < 1e-10


# -- insightface's files --------------------------------------------------------------------------

def _insightface_split(num_classes, world):
    """PartialFC_V2's (class_start, num_local) per rank, written out from its constructor."""
    base, extra = num_classes // world, num_classes % world
    return [(base * r + min(r, extra), base + int(r < extra)) for r in range(world)]


def _write_insightface_files(directory, weight, world, checkpoint):
    paths = []
    for rank, (start, num_local) in enumerate(_insightface_split(weight.shape[0], world)):
        state = {"weight": weight[start : start + num_local].clone()}
        if checkpoint:   # train_v2.py's checkpoint_gpu_{rank}.pt
            path = directory / f"checkpoint_gpu_{rank}.pt"
            state = {"epoch": 3, "global_step": 30, "state_dict_softmax_fc": state}
        else:            # softmax_fc_gpu_{rank}.pt: module_partial_fc.state_dict()
            path = directory / f"softmax_fc_gpu_{rank}.pt"
        torch.save(state, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("checkpoint", [False, True])
def test_from_insightface_single_device(tmp_path, checkpoint):
    g = torch.Generator().manual_seed(4)
    full = torch.randn(11, D, generator=g, dtype=torch.float64)
    paths = _write_insightface_files(tmp_path, full, 3, checkpoint)
    head = compat.from_insightface(paths, margin_list=(1.0, 0.4, 0.0), scale=32.0, backend="torch")
    assert isinstance(head, ak.CombinedMarginLoss) and torch.equal(head.weight.data, full)
    x, y = torch.randn(6, D, generator=g, dtype=torch.float64), torch.randint(0, 11, (6,), generator=g)
    torch.testing.assert_close(head(x, y), ak.margin_softmax_loss(x, full, y, scale=32.0, m2=0.4,
                                                                  backend="reference"), rtol=1e-12, atol=0)


def test_from_insightface_interclass_filtering():
    """insightface's interclass_filtering_threshold passes through to the head (nontarget="filter")
    and gives its filtered loss (tests/authors_heads.py) with its straight-through ArcFace gradient."""
    full, x, y = _problem(3 * ROWS_PER_RANK, seed=5)
    cos = F.normalize(x, dim=1) @ F.normalize(full, dim=1).T
    hard = (cos > 0.2) & ~F.one_hot(y, NUM_CLASSES).bool()
    assert 0.02 < hard.double().mean() < 0.9  # both sides of the threshold
    head = compat.from_insightface(compat.reshard(full, 1), scale=SCALE, interclass_filtering_threshold=0.2,
                                   backend="reference")
    xr, wr = x.clone().requires_grad_(True), full.clone().requires_grad_(True)
    want = _grads(combined_margin_filtered(xr, wr, y, scale=SCALE, m2=0.5, threshold=0.2), xr, wr)
    _assert_parity(_head_grads(head, x, y), want)


def test_from_insightface_sub_centers():
    """Shards with K rows per class (ours: insightface has none) give a sub-centre head."""
    g = torch.Generator().manual_seed(6)
    full = torch.randn(NUM_CLASSES * 2, D, generator=g, dtype=torch.float64)
    head = compat.from_insightface(compat.reshard(full, 3, sub_centers=2), sub_centers=2, backend="torch")
    assert (head.num_classes, head.sub_centers) == (NUM_CLASSES, 2) and torch.equal(head.weight.data, full)
    x, y = torch.randn(6, D, generator=g, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (6,), generator=g)
    want = ak.margin_softmax_loss(x, full, y, sub_centers=2, margin_grad="straight_through", backend="reference")
    torch.testing.assert_close(head(x, y), want, rtol=1e-12, atol=0)


def test_gather_and_reshard():
    full = torch.randn(10 * 2, D)   # 10 classes, 2 sub-centres each
    for world in (1, 3, 4):
        shards = compat.reshard(full, world, sub_centers=2)
        sizes = [s["weight"].shape[0] // 2 for s in shards]
        assert sizes == [n for _, n in _insightface_split(10, world)]
        assert torch.equal(compat.gather_shards(shards, sub_centers=2), full)
    shards = compat.reshard(full[:11], 3)
    with pytest.raises(ValueError, match="rank-ordered split"):
        compat.gather_shards(shards[::-1])
    with pytest.raises(ValueError, match="no 'weight'"):
        compat.gather_shards([{"weight_activated": full}])


def _sharded_from_files(rank, world, paths, full):
    """Shards written by 3 insightface ranks, loaded on `world` ranks: each holds its split, the
    loss equals the single-process loss, and the saved state_dicts gather back to the same weight."""
    head = compat.from_insightface(paths, sharded=True, backend="torch", ddp_backbone=False)
    start, num_local = _insightface_split(full.shape[0], world)[rank]
    assert torch.equal(head.weight.data, full[start : start + num_local])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4 * world, D, generator=g, dtype=torch.float64), torch.randint(0, 11, (4 * world,), generator=g)
    loss = head(x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]).detach()
    torch.distributed.all_reduce(loss)
    torch.testing.assert_close(loss, ak.margin_softmax_loss(x, full, y, backend="reference"), rtol=1e-12, atol=0)
    states = [None] * world
    torch.distributed.all_gather_object(states, head.state_dict())
    assert torch.equal(compat.gather_shards(states), full)
    # sub-centres: 2 rows per class, re-split for this world size
    full2 = torch.cat([full, full.flip(0)], dim=1).view(-1, D)
    head2 = compat.from_insightface(compat.reshard(full2, 3, sub_centers=2), sub_centers=2, sharded=True,
                                    backend="torch", ddp_backbone=False)
    assert torch.equal(head2.weight.data, full2[2 * start : 2 * (start + num_local)])
    loss2 = head2(x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]).detach()
    torch.distributed.all_reduce(loss2)
    torch.testing.assert_close(loss2, ak.margin_softmax_loss(x, full2, y, sub_centers=2, backend="reference"),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("world", [2])
def test_from_insightface_sharded_other_world_size(tmp_path, world):
    full = torch.randn(11, D, dtype=torch.float64)
    paths = [str(p) for p in _write_insightface_files(tmp_path, full, 3, checkpoint=False)]
    run_ranks(_sharded_from_files, world, paths, full)
