"""pytest-benchmark microbenchmarks: this library's backends against the peers, one group per
pass, margin and shape.

    python -m pytest bench --benchmark-only --benchmark-group-by=group          # measure, side by side
    python -m pytest bench --benchmark-only --benchmark-autosave                 # keep a run ...
    python -m pytest bench --benchmark-only --benchmark-group-by=group --benchmark-compare   # ... and compare
    python -m pytest bench --benchmark-only --bench-shapes=large                 # headline shapes (GPU)

Groups are "<pass> <margin> NxCxD": pass is forward (the loss, graph built as in training) or
backward (loss.backward() on a fresh forward each round, the forward untimed); margin is arcface
(m2 = 0.5) or softmax (no margin, where torch's own F.linear_cross_entropy joins, with and without
its chunking options). Each group holds this library's backends that run on this device (`torch`;
`triton` and `cuda` on a GPU) and the peers of bench/peers.py: the eager reference head,
insightface-style heads with fp32 and bf16 logits, a pytorch-metric-learning-style head and
torch.compile of the reference. Every member is run once (and checked against the float64
reference) before it is timed, so compilation stays out of the numbers.

Without an option that asks for measurements (see conftest.py) each case runs once as a test.
"""

import functools
import time

import pytest
import torch

from arcface_kernels.backends import FUSED_BACKEND_NAMES, backend_status
from bench import peers
from bench.compare import HEADLINE_SHAPES, MARGINS, make_inputs
from bench.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SCALE = 64.0
BENCH_MARGINS = ("arcface", "softmax")
SHAPES = {"quick": [(16, 300, 32)],
          "default": [(4096, 262144, 512)] if DEVICE.type == "cuda" else [(64, 2000, 64)],
          "large": HEADLINE_SHAPES}
# Relative error of the loss against the float64 reference that a member may show at DTYPE, by the
# dtype its logits are in.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def parse_shapes(text):
    if text in SHAPES:
        return SHAPES[text]
    shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise pytest.UsageError(f"--bench-shapes: quick, default, large or N,C,D[;N,C,D...], got {text!r}")
    return shapes


@functools.cache
def members(margin):
    """(name, loss function or the reason it is absent) of a group: the peers, and the fused
    backends that run on DEVICE (the others are not part of the group: they need another device)."""
    impls = peers.implementations(DEVICE, peers.is_plain_softmax(dict(MARGINS[margin])))
    fused_elsewhere = {f"arcface_kernels[{name}]" for name in FUSED_BACKEND_NAMES
                       if not backend_status(name, DEVICE)[0]}
    return {name: impl for name, impl in impls
            if not isinstance(impl, str) or (name not in fused_elsewhere and name not in peers.THIRD_PARTY)}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    shapes = parse_shapes(metafunc.config.getoption("--bench-shapes"))
    cases = [pytest.param((margin, shape, name), id=f"{margin}-{'x'.join(map(str, shape))}-{name}")
             for margin in BENCH_MARGINS for shape in shapes for name in members(margin)]
    metafunc.parametrize("case", cases)


class Problem:
    def __init__(self, case, pass_name, benchmark):
        margin, shape, name = case
        impl = members(margin)[name]
        if isinstance(impl, str):
            pytest.skip(f"{name}: {impl}")
        self.spec = dict(scale=SCALE, **MARGINS[margin])
        self.loss_fn = impl
        x, w, self.y = make_inputs(*shape, DTYPE, DEVICE)
        self.x, self.w = x.requires_grad_(True), w.requires_grad_(True)
        benchmark.group = f"{pass_name} {margin} {'x'.join(map(str, shape))}"
        benchmark.extra_info.update(member=name, margin=margin, shape=list(shape), dtype=str(DTYPE), device=DEVICE.type)
        self.check(name)

    def forward(self):
        return self.loss_fn(self.x, self.w, self.y, self.spec)

    def fresh_forward(self):
        self.x.grad = self.w.grad = None
        return (self.forward(),), {}

    def check(self, name):
        """One forward and backward before any timing (compiles what compiles, warms caches),
        checked against the float64 reference: every member computes the same loss."""
        loss = self.forward()
        loss.backward()
        expected = peers.ours("reference")(self.x.detach().double(), self.w.detach().double(), self.y, self.spec)
        logits_dtype = torch.bfloat16 if "bf16" in name else DTYPE
        error = abs(float(loss.detach()) - float(expected)) / abs(float(expected))
        assert error < TOLERANCE[logits_dtype], (name, float(loss), float(expected))
        assert torch.isfinite(self.x.grad).all() and torch.isfinite(self.w.grad).all(), name


def _rounds(request, seconds_per_call):
    """pytest-benchmark's own rule for benchmark(fn), for pedantic runs: as many rounds as fit in
    --benchmark-max-time, at least --benchmark-min-rounds."""
    max_time = float(request.config.getoption("benchmark_max_time"))
    return max(request.config.getoption("benchmark_min_rounds"), int(max_time / max(seconds_per_call, 1e-9)))


def bench_forward(benchmark, case):
    problem = Problem(case, "forward", benchmark)

    def forward():
        loss = problem.forward()
        synchronize(DEVICE)
        return loss

    loss = benchmark(forward)
    assert torch.isfinite(loss)


def bench_backward(benchmark, case, request):
    problem = Problem(case, "backward", benchmark)

    def backward(loss):
        loss.backward()
        synchronize(DEVICE)

    (loss,), _ = problem.fresh_forward()
    start = time.perf_counter()
    backward(loss)
    rounds = _rounds(request, time.perf_counter() - start)
    benchmark.pedantic(backward, setup=problem.fresh_forward, rounds=rounds)
    assert torch.isfinite(problem.w.grad).all()
