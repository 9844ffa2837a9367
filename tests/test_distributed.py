"""The sharded loss on 1, 2 and 3 processes equals the single-process reference on the
concatenated inputs: loss, every rank's embedding gradient, every shard's weight gradient.
CPU processes with gloo everywhere; one GPU per process with NCCL where there are enough GPUs."""

import pytest
import torch
import torch.distributed as dist
from float64_oracle import oracle
from spawn import run_ranks

import arcface_kernels as ak
from arcface_kernels.distributed import (
    ShardedAdaFaceLoss,
    ShardedCurricularFaceLoss,
    ShardedMarginLoss,
    shard_bounds,
    sharded_margin_softmax_loss,
)
from helpers import confident_problem

# rows per rank (uneven) for each world size
BATCH_SIZES = {1: [7], 2: [5, 2], 3: [3, 6, 1]}
N_CLASSES, DIM = 11, 6


def _problem(k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = 10
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64, device="cpu")
    w = torch.randn(N_CLASSES * k, DIM, generator=g, dtype=torch.float64, device="cpu")
    y = torch.randint(0, N_CLASSES, (n,), generator=g, device="cpu")
    y[1] = -100
    device = torch.get_default_device()  # the worker's GPU under NCCL
    return x.to(device, dtype), w.to(device, dtype), y.to(device)


def _reference(x, w, y, weights, **options):
    x = x.detach().double().clone().requires_grad_(True)
    w = w.detach().double().clone().requires_grad_(True)
    loss, stats = ak.margin_softmax_loss(x, w, y, backend="reference", return_stats=True, **options)
    (loss * weights).sum().backward() if loss.dim() else loss.backward()
    return loss.detach(), x.grad, w.grad, stats.top1


def _close(a, b, tol, what):
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.2e}"


def _check_matches_reference(rank, world, k, dtype, reduction, options):
    sizes = BATCH_SIZES[world]
    n = sum(sizes)
    x, w, y = _problem(k, dtype, seed=k + world)
    x, y = x[:n], y[:n]
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    start, stop = shard_bounds(N_CLASSES, world, rank)
    weights = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    ref_loss, ref_dx, ref_dw, ref_top1 = _reference(x, w, y, weights, sub_centers=k, reduction=reduction, **options)
    margins = {m: (v[rows] if isinstance(v, torch.Tensor) else v) for m, v in options.items()}
    x_local = x[rows].clone().requires_grad_(True)
    w_shard = w[start * k : stop * k].clone().requires_grad_(True)
    loss, stats = sharded_margin_softmax_loss(x_local, w_shard, y[rows], class_offset=start, num_classes=N_CLASSES,
                                              sub_centers=k, reduction=reduction, return_stats=True,
                                              backend="torch", **margins)
    (loss * weights[rows].to(loss.dtype)).sum().backward() if loss.dim() else loss.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    if reduction == "none":
        _close(loss, ref_loss[rows], tol, "loss rows")
    else:
        total = loss.detach().clone()
        dist.all_reduce(total)
        _close(total, ref_loss, tol, "summed loss")
    _close(x_local.grad, ref_dx[rows], tol, "dX")
    _close(w_shard.grad, ref_dw[start * k : stop * k], tol, "dW")
    assert torch.equal(stats.top1, ref_top1[rows])


def _check_sampling(rank, world):
    sizes = BATCH_SIZES[world]
    x, w, y = _problem(1, torch.float64, seed=3)
    n = sum(sizes)
    x, y = x[:n], y[:n]
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    head = ShardedMarginLoss(N_CLASSES, DIM, scale=16.0, sample_rate=0.4, seed=1, dtype=torch.float64,
                             ddp_backbone=False, backend="torch")
    with torch.no_grad():
        head.weight.copy_(w[head.class_start : head.class_stop])
    x_local = x[rows].clone().requires_grad_(True)
    loss = head(x_local, y[rows])
    loss.backward()
    sampled = [None] * world
    dist.all_gather_object(sampled, head.sampled_classes.tolist())
    classes = torch.tensor(sorted(sum(sampled, [])))
    positives = set(y[y >= 0].tolist())
    assert positives <= set(classes.tolist()), "every positive class is kept"
    for r in range(world):
        lo, hi = shard_bounds(N_CLASSES, world, r)
        assert len(sampled[r]) >= min(hi - lo, -(-(hi - lo) * 4 // 10))
    # Single process restricted to the same classes, labels renumbered.
    remapped = torch.where(y >= 0, torch.searchsorted(classes, y.clamp_min(0)), -100)
    ref_loss, ref_dx, ref_dw, _ = _reference(x, w[classes], remapped, None, scale=16.0)
    total = loss.detach().clone()
    dist.all_reduce(total)
    _close(total, ref_loss, 1e-10, "sampled loss")
    _close(x_local.grad, ref_dx[rows], 1e-10, "sampled dX")
    full_dw = torch.zeros_like(w)
    full_dw[classes] = ref_dw
    _close(head.weight.grad, full_dw[head.class_start : head.class_stop], 1e-10, "sampled dW")
    unsampled = torch.ones(head.class_stop - head.class_start, dtype=torch.bool)
    unsampled[head.sampled_classes - head.class_start] = False
    assert torch.all(head.weight.grad[unsampled] == 0)


def _check_errors(rank, world):
    x = torch.randn(2, DIM)
    start, stop = shard_bounds(N_CLASSES, world, rank)
    w = torch.randn(stop - start, DIM)
    y = torch.tensor([start, start])
    if world > 1:
        with pytest.raises(ValueError, match="ranks disagree on scale"):
            sharded_margin_softmax_loss(x, w, y, class_offset=start, num_classes=N_CLASSES, scale=10.0 + rank)
        with pytest.raises(ValueError, match="ranks disagree on nontarget_t"):
            sharded_margin_softmax_loss(x, w, y, class_offset=start, num_classes=N_CLASSES, nontarget="mv",
                                        nontarget_t=1.1 + rank)
        with pytest.raises(ValueError, match="contiguous"):
            sharded_margin_softmax_loss(x, w, y, class_offset=0, num_classes=N_CLASSES)
    bad = torch.tensor([start, N_CLASSES + 5]) if rank == world - 1 else y
    with pytest.raises(ValueError, match=rf"ranks \[{world - 1}\] have labels outside"):
        sharded_margin_softmax_loss(x, w, bad, class_offset=start, num_classes=N_CLASSES)


def _sharded_rows(x, w, y, rank, world, upstream=1.0, **options):
    """This rank's loss rows, dX rows and weight-shard gradient of sum(loss rows) * upstream."""
    sizes = [x.shape[0] // world + (r < x.shape[0] % world) for r in range(world)]
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    n_classes = w.shape[0]
    start, stop = shard_bounds(n_classes, world, rank)
    x_local = x[rows].clone().requires_grad_(True)
    w_shard = w[start:stop].clone().requires_grad_(True)
    loss = sharded_margin_softmax_loss(x_local, w_shard, y[rows], class_offset=start, num_classes=n_classes,
                                       reduction="none", backend="torch", **options)
    (loss.sum() * upstream).backward()
    return loss.detach(), x_local.grad, w_shard.grad, rows, slice(start, stop)


def _check_hard_rows(rank, world):
    """Rows the sharded path must treat as the single-device op does (op.forward_stats and
    op.backward_core): entries near float32's largest value, well-classified rows, and float16
    gradients past 65504, against the float64 oracle."""
    # entries near 3e38: overflow-safe rows (docs/design.md section 2), no NaN
    x, w, y = _problem(1, torch.float32, seed=11)
    x, w = x / x.abs().amax(1, keepdim=True), w / w.abs().amax(1, keepdim=True)
    x[0] *= 3e38
    w[y[2]] *= 3e38
    y[1] = 0
    loss, dx, dw, rows, shard = _sharded_rows(x, w, y, rank, world, scale=8.0)
    want = oracle(x.cpu(), w.cpu(), y.cpu(), scale=8.0, reduction="none")
    for got, ref, what in ((loss, want[0][rows], "huge rows' loss"), (dx, want[1][rows], "huge rows' dX"),
                           (dw, want[2][shard], "huge rows' dW")):
        assert torch.isfinite(got).all(), what
        _close(got, ref, 1e-4, what)
    # well-classified rows: losses of 1e-7 keep their relative precision, and so do the gradients
    x, w, y = confident_problem(10)
    want = oracle(x, w, y, scale=30.0, reduction="none")
    assert want[0].max() < 1e-6
    loss, dx, dw, rows, shard = _sharded_rows(x, w, y, rank, world, scale=30.0)
    _close(loss, want[0][rows], 1e-4, "confident loss")
    _close(dx, want[1][rows], 1e-4, "confident dX")
    _close(dw, want[2][shard], 1e-4, "confident dW")
    # float16 gradients scaled by a GradScaler's 2**16: inf past float16's range, never clamped
    x, w, y = _problem(1, torch.float32, seed=12)
    x = (x / x.norm(dim=1, keepdim=True) * torch.logspace(-3, 2, x.shape[0])[:, None]).half()
    w = w.half()
    scale = 2.0**16
    _, dx, dw, rows, shard = _sharded_rows(x, w, y, rank, world, upstream=scale)
    want = oracle(x.cpu(), w.cpu(), y.cpu(), reduction="none")
    limit = torch.finfo(torch.float16).max
    for got, ref in ((dx, want[1][rows] * scale), (dw, want[2][shard] * scale)):
        over, under = ref.abs() > 1.01 * limit, ref.abs() < 0.99 * limit
        assert torch.isinf(got[over]).all() and not (got.abs() == limit).any()
        _close(got[under], ref[under], 5e-3, "float16 gradient")
    overflowed = torch.tensor([float(torch.isinf(dx).any())])
    dist.all_reduce(overflowed)
    assert overflowed.item() > 0  # the smallest rows' gradients did overflow somewhere


def _worker(rank, world):
    per_row = torch.linspace(0.2, 0.6, sum(BATCH_SIZES[world]), dtype=torch.float64)
    cases = [
        (1, torch.float64, "mean", dict(m2=0.5)),
        (2, torch.float64, "sum", dict(m1=1.2, m2=0.2, m3=0.1, label_smoothing=0.1)),
        (3, torch.float64, "none", dict(m2=per_row, scale=8.0)),
        (1, torch.float32, "mean", dict(m3=0.35, label_smoothing=0.2)),
        (1, torch.float64, "mean", dict(m2=per_row - 0.4, m3=0.2, fallback="clip", clip_eps=0.05)),
    ]
    for k, dtype, reduction, options in cases:
        _check_matches_reference(rank, world, k, dtype, reduction, options)
    _check_sampling(rank, world)
    _check_errors(rank, world)


def _check_margin_gradient_and_nontarget_modes(rank, world):
    """Per-row m2, m3 that require grad get their gradient for this rank's rows (op.margin_gradients
    on the merged statistics), and each non-target mode (the target cosines merged over the
    shards before the threshold) gives the single-process result."""
    sizes = BATCH_SIZES[world]
    n = sum(sizes)
    x, w, y = _problem(1, torch.float64, seed=21)
    x, y = x[:n], y[:n]
    x = x + 2.0 * w[y.clamp_min(0)]  # rows nearer their centre: hard negatives on both sides of the threshold
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    start, stop = shard_bounds(N_CLASSES, world, rank)
    settings = [
        dict(m2=torch.linspace(0.2, 0.6, n, dtype=torch.float64), m3=torch.linspace(0.0, 0.15, n,
                                                                                     dtype=torch.float64)),
        dict(m2=0.5, nontarget="curricular", nontarget_t=0.3, label_smoothing=0.1),
        dict(scale=32.0, m2=0.35, easy_margin=True, nontarget="mv", nontarget_t=1.12),
        dict(m2=0.0, m3=0.35, nontarget="filter", nontarget_t=0.2),
    ]
    for options in settings:
        margins = [m for m in ("m2", "m3") if isinstance(options.get(m), torch.Tensor)]
        full = {m: options[m].clone().requires_grad_(True) for m in margins}
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = ak.margin_softmax_loss(xr, wr, y, backend="reference", **{**options, **full})
        ref.backward()
        local = {m: options[m][rows].clone().requires_grad_(True) for m in margins}
        x_local, w_shard = x[rows].clone().requires_grad_(True), w[start:stop].clone().requires_grad_(True)
        loss = sharded_margin_softmax_loss(x_local, w_shard, y[rows], class_offset=start, num_classes=N_CLASSES,
                                           backend="torch", **{**options, **local})
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        what = options.get("nontarget", "per-row margins")
        _close(total, ref.detach(), 1e-10, f"{what}: summed loss")
        _close(x_local.grad, xr.grad[rows], 1e-10, f"{what}: dX")
        _close(w_shard.grad, wr.grad[start:stop], 1e-10, f"{what}: dW")
        for m in margins:
            assert full[m].grad[rows].abs().max() > 0
            _close(local[m].grad, full[m].grad[rows], 1e-10, f"d loss / d {m}")
    # a MagFace-style margin computed from |x| under ddp_backbone=True: its path into x takes the
    # same x W correction as the direct one (DDP then averages the backbone's gradient over W)
    head = ShardedMarginLoss(N_CLASSES, DIM, dtype=torch.float64, backend="torch")
    with torch.no_grad():
        head.weight.copy_(w[start:stop])
    xr = x.clone().requires_grad_(True)
    ak.margin_softmax_loss(xr, w, y, m2=0.3 + 0.05 * xr.norm(dim=1), backend="reference").backward()
    x_local = x[rows].clone().requires_grad_(True)
    head(x_local, y[rows], m2=0.3 + 0.05 * x_local.norm(dim=1)).backward()
    _close(x_local.grad, world * xr.grad[rows], 1e-10, "dX through a margin of |x|, ddp_backbone")


def _check_global_statistics(rank, world):
    """ShardedAdaFaceLoss / ShardedCurricularFaceLoss (and with Partial FC) over 3 training steps and
    an eval step: the loss summed over ranks, this rank's dX, the shard's dW and the running buffers
    equal one process's head on the concatenated batch."""
    sizes = BATCH_SIZES[world]
    n = sum(sizes)
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    start, stop = shard_bounds(N_CLASSES, world, rank)
    heads = [(ak.AdaFaceLoss, ShardedAdaFaceLoss, ("batch_mean", "batch_std"), dict(t_alpha=0.3)),
             (ak.CurricularFaceLoss, ShardedCurricularFaceLoss, ("t",), dict(t_alpha=0.3))]
    for single_cls, sharded_cls, buffers, settings in heads:
        _, w, _ = _problem(1, torch.float64, seed=30)
        single = single_cls(N_CLASSES, DIM, dtype=torch.float64, backend="reference", **settings)
        sharded = sharded_cls(N_CLASSES, DIM, dtype=torch.float64, ddp_backbone=False, backend="torch", **settings)
        sampled = sharded_cls(N_CLASSES, DIM, dtype=torch.float64, ddp_backbone=False, backend="torch",
                              sample_rate=0.5, **settings)
        with torch.no_grad():
            single.weight.copy_(w)
            sharded.weight.copy_(w[start:stop])
            sampled.weight.copy_(w[start:stop])
        for step in range(4):
            for head in (single, sharded, sampled):
                head.train(step < 3)
                head.weight.grad = None
            x, _, y = _problem(1, torch.float64, seed=31 + step)
            x, y = x[:n], y[:n]
            x = (x + 1.5 * w[y.clamp_min(0)]) * torch.linspace(1.0, 40.0, n, dtype=torch.float64)[:, None]
            xr = x.clone().requires_grad_(True)
            ref = single(xr, y)
            ref.backward()
            x_local = x[rows].clone().requires_grad_(True)
            loss = sharded(x_local, y[rows])
            loss.backward()
            sampled(x[rows], y[rows])
            total = loss.detach().clone()
            dist.all_reduce(total)
            what = f"{sharded_cls.__name__} step {step}"
            _close(total, ref.detach(), 1e-10, f"{what}: summed loss")
            _close(x_local.grad, xr.grad[rows], 1e-10, f"{what}: dX")
            _close(sharded.weight.grad, single.weight.grad[start:stop], 1e-10, f"{what}: dW")
            for name in buffers:
                want = getattr(single, name)
                for head in (sharded, sampled):
                    _close(getattr(head, name), want, 1e-12, f"{what}: {name}")
        initial = 20.0 if buffers[0] == "batch_mean" else 0.0
        assert float(getattr(single, buffers[0])) != initial  # the buffers did move


def _enough_gpus(world):
    return torch.cuda.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= world


@pytest.mark.parametrize("comm", ["gloo", "nccl"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_loss_equals_single_process(world, comm):
    if comm == "nccl" and not _enough_gpus(world):
        pytest.skip(f"NCCL needs {world} GPU(s)")
    run_ranks(_worker, world, comm=comm)


def _check_margin_family(rank, world):
    _check_margin_gradient_and_nontarget_modes(rank, world)
    _check_global_statistics(rank, world)


def test_sharded_margin_family_equals_single_process():
    """Issue 18 on 2 ranks (one spawn for both checks): per-row margins with gradient, the
    non-target modes, and the heads' global-batch statistics."""
    run_ranks(_check_margin_family, 2)


def test_sharded_hard_rows_follow_the_single_device_rules():
    run_ranks(_check_hard_rows, 2)


def test_shard_bounds_tile_the_classes():
    for c, w in [(11, 3), (10, 5), (7, 7), (100, 8)]:
        bounds = [shard_bounds(c, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="at least the world size"):
        shard_bounds(2, 3, 0)
