"""One edge-case suite over every entry path (issue: no silent wrong answer on any entry path).

The paths (entry_paths.py): the functional op on every backend available here (triton joins under
the interpreter run, test_triton_interpreter.py), the reference backend, a head, a Partial FC
head, and — inside 2 gloo ranks — the sharded function and the sharded head with Partial FC.
Each is compared with the float64 formula (float64_oracle.py) on: huge and tiny rows, confident
rows, ignored and uint8 labels, sub-centres with margins and smoothing, empty batches with
sub_centers > 1; and checked for stats under autograd, autocast with backward inside and outside
the block, GradScaler overflow and torch.compile(fullgraph=True, dynamic=True).
"""

import pytest
import torch
import torch.distributed as dist
from entry_paths import (
    CASES,
    DEFAULT_TOLERANCE,
    KEEP_EVERY_CLASS,
    SINGLE_PROCESS_PATHS,
    TOLERANCE,
    mismatches,
    op_path,
    oracle_options,
    relative_error,
    run,
)
from float64_oracle import oracle
from spawn import run_ranks

import arcface_kernels as ak
from arcface_kernels.distributed import ShardedMarginLoss, shard_bounds, sharded_margin_softmax_loss
from conftest import BACKENDS, INTERPRETED

PATHS = dict({f"op-{name}": op_path(name) for name in BACKENDS}, **SINGLE_PROCESS_PATHS)


def _reference(x, w, y, options):
    return oracle(x, w, y.long(), **oracle_options(options))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", PATHS)
def test_edge_cases_match_the_float64_formula(path, case):
    x, w, y, options = CASES[case]()
    loss, x_leaf, w_leaf = run(PATHS[path], x, w, y, options)
    loss.backward()
    ref = _reference(x, w, y, options)
    bad = mismatches(loss.detach(), x_leaf.grad, w_leaf.grad, ref, TOLERANCE.get(case, DEFAULT_TOLERANCE))
    assert not bad, f"{path} on {case}: {bad}"


@pytest.mark.parametrize("path", PATHS)
def test_stats_carry_no_gradient(path):
    x, w, y, options = CASES["sub_centers_and_margins"]()
    (loss, stats), _, _ = run(PATHS[path], x, w, y, options, return_stats=True)
    with pytest.raises(RuntimeError, match="carry no gradient"):
        (loss + stats.lse.sum()).backward()


# the interpreter's numpy warns on inf - inf and exp(inf): expected here
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["embeddings", "weight"])
@pytest.mark.parametrize("path", PATHS)
def test_non_finite_inputs_propagate(path, where, value):
    """The documented rule (README, "Non-finite inputs"): no check (it would cost a host sync per
    step), but never a finite wrong answer: the loss is NaN and so is some gradient, which
    GradScaler and anomaly checks see."""
    x, w, y, options = CASES["sub_centers_and_margins"]()
    (x if where == "embeddings" else w)[1, 2] = value
    loss, x_leaf, w_leaf = run(PATHS[path], x, w, y, options)
    loss.backward()
    assert torch.isnan(loss)
    assert not (torch.isfinite(x_leaf.grad).all() and torch.isfinite(w_leaf.grad).all())


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-outside", "backward-inside"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", PATHS)
def test_autocast_with_float32_master_tensors(path, dtype, backward_inside):
    """CPU autocast over float32 tensors: the loss of the rounded operands, computed in float32 by
    every path alike, and float32 gradients equal to the formula's for those operands."""
    if path == "op-triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot gives wrong results under the Triton interpreter; bf16 is checked on a GPU")
    x, w, y, options = CASES["sub_centers_and_margins"]()
    with torch.autocast("cpu", dtype=dtype):
        loss, x_leaf, w_leaf = run(PATHS[path], x, w, y, options)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert x_leaf.grad.dtype == w_leaf.grad.dtype == torch.float32
    rounded = [t.to(dtype).double() for t in (x, w)]
    bad = mismatches(loss.detach(), x_leaf.grad, w_leaf.grad, _reference(*rounded, y, options), 1e-4)
    assert not bad, f"{path} under autocast: {bad}"


def _overflowing_step(path):
    """One fp16 autocast step of a tiny backbone + head with GradScaler's default init_scale
    (2**16): small embeddings make the scaled embedding gradient overflow float16."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(4, 8)
    with torch.no_grad():
        backbone.weight.mul_(1e-4)
        backbone.bias.zero_()
    x_in = torch.randn(6, 4)
    y = torch.arange(6) % 5
    head = ak.CombinedMarginLoss(5, 8, backend=path.removeprefix("op-")) if path.startswith("op-") else \
        ak.CombinedMarginLoss(5, 8, backend="torch", sample_rate=KEEP_EVERY_CLASS if path == "partial_fc" else 1.0)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        embeddings = backbone(x_in)
        embeddings.retain_grad()
        loss = head(embeddings, y)
    scaler.scale(loss).backward()
    return backbone, head, embeddings, x_in, y, scaler


@pytest.mark.parametrize("path", [p for p in PATHS if p != "op-reference"] + ["op-reference"])
def test_grad_scaler_sees_overflow_and_master_weight_is_exact(path):
    backbone, head, embeddings, x_in, y, scaler = _overflowing_step(path)
    scale = scaler.get_scale()
    weight_before = head.weight.detach().clone()
    _, ref_dx, ref_dw = oracle(embeddings.detach().double(), head.weight.detach().half().double(), y)
    # float16 embedding gradient: inf where the true scaled value overflows float16, never 65504
    true_dx = ref_dx * scale
    overflow = true_dx.abs() > torch.finfo(torch.float16).max
    assert overflow.any(), "the problem must overflow float16"
    got = embeddings.grad
    assert torch.isinf(got[overflow]).all() and (got[overflow].sign() == true_dx[overflow].sign()).all()
    assert not (got.abs() == torch.finfo(torch.float16).max).any(), "saturated at 65504"
    # the float32 master weight gets its float32 gradient (no float16 on its way)
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
    assert (head.weight.grad.abs() > torch.finfo(torch.float16).max).any()
    assert relative_error(head.weight.grad, ref_dw * scale) < 1e-3
    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(head.weight, weight_before), "GradScaler must skip the step"
    assert scaler.get_scale() < scale


@pytest.mark.parametrize("path", [p for p in PATHS if p != "partial_fc"])
def test_compiled_fullgraph_dynamic_equals_eager(path):
    """torch.compile(fullgraph=True, dynamic=True): no graph break, same loss and gradients.
    (Partial FC draws a data-dependent number of classes: not a fullgraph program.)"""
    x, w, y, options = CASES["sub_centers_and_margins"]()
    eager, x_eager, w_eager = run(PATHS[path], x, w, y, options)
    eager.backward()
    loss_fn, w_leaf = PATHS[path](w, options)
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for n in (7, 5):  # two batch sizes, one dynamic graph
        x_leaf = x[:n].clone().requires_grad_(True)
        w_leaf.grad = None
        loss = compiled(x_leaf, y[:n])
        loss.backward()
        if n == 7:
            assert relative_error(loss, eager) < 1e-6
            assert relative_error(x_leaf.grad, x_eager.grad) < 1e-5
            assert relative_error(w_leaf.grad, w_eager.grad) < 1e-5


# -- the sharded paths, inside 2 gloo ranks ------------------------------------------------------------

def _split(n, world, rank):
    sizes = [n // world + (r < n % world) for r in range(world)]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _sharded_run(kind, rank, world, x, w, y, options, return_stats=False):
    """(output, x_local leaf, w_shard leaf, rows, weight rows) of one rank."""
    k = options.get("sub_centers", 1)
    num_classes = w.shape[0] // k
    rows = _split(x.shape[0], world, rank)
    start, stop = shard_bounds(num_classes, world, rank)
    weight_rows = slice(start * k, stop * k)
    x_local = x[rows].clone().requires_grad_(True)
    if kind == "sharded":
        w_shard = w[weight_rows].clone().requires_grad_(True)
        out = sharded_margin_softmax_loss(x_local, w_shard, y[rows], class_offset=start, num_classes=num_classes,
                                          return_stats=return_stats, backend="torch", **options)
    else:
        head = ShardedMarginLoss(num_classes, w.shape[1], sample_rate=KEEP_EVERY_CLASS, ddp_backbone=False,
                                 backend="torch", dtype=w.dtype, **options)
        with torch.no_grad():
            head.weight.copy_(w[weight_rows])
        w_shard = head.weight
        out = head(x_local, y[rows], return_stats=return_stats)
    return out, x_local, w_shard, rows, weight_rows


def _sharded_edge_cases(rank, world):
    failures = []
    for kind in ("sharded", "sharded_partial_fc"):
        for case, make in CASES.items():
            x, w, y, options = make()
            loss, x_local, w_shard, rows, weight_rows = _sharded_run(kind, rank, world, x, w, y, options)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            ref_loss, ref_dx, ref_dw = _reference(x, w, y, options)
            bad = mismatches(total, x_local.grad, w_shard.grad, (ref_loss, ref_dx[rows], ref_dw[weight_rows]),
                             TOLERANCE.get(case, DEFAULT_TOLERANCE))
            if bad:
                failures.append(f"rank {rank} {kind} {case}: {bad}")
        x, w, y, options = CASES["sub_centers_and_margins"]()
        (loss, stats), *_ = _sharded_run(kind, rank, world, x, w, y, options, return_stats=True)
        try:
            (loss + stats.lse.sum()).backward()
            failures.append(f"rank {rank} {kind}: a loss built on stats.lse was differentiated")
        except RuntimeError as err:
            if "carry no gradient" not in str(err):
                raise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, x_local, w_shard, rows, weight_rows = _sharded_run(kind, rank, world, x, w, y, options)
            loss.backward()  # inside the autocast block
        total = loss.detach().clone()
        dist.all_reduce(total)
        ref_loss, ref_dx, ref_dw = _reference(x.to(torch.bfloat16), w.to(torch.bfloat16), y, options)
        bad = mismatches(total, x_local.grad, w_shard.grad, (ref_loss, ref_dx[rows], ref_dw[weight_rows]), 1e-4)
        if bad:
            failures.append(f"rank {rank} {kind} autocast: {bad}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_sharded_paths_on_the_same_edge_cases():
    run_ranks(_sharded_edge_cases, 2)
