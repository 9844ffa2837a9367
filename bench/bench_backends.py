"""pytest-benchmark microbenchmarks: forward, backward and forward+backward per fused backend.

    python -m pytest bench --benchmark-enable            # measure (GPU: headline-like shape)

In CI (--benchmark-disable, the default in pyproject) each runs once as a plain test.
"""

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.backends import FUSED_BACKEND_NAMES, backend_status
from bench.compare import make_inputs
from bench.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [name for name in FUSED_BACKEND_NAMES if backend_status(name, DEVICE)[0]] + ["reference"]
SHAPES = [(4096, 262144, 512)] if DEVICE.type == "cuda" else [(64, 2000, 64)]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _problem(shape):
    x, w, y = make_inputs(*shape, DTYPE, DEVICE)
    return x.requires_grad_(True), w.requires_grad_(True), y


def _synced(fn):
    def run():
        out = fn()
        synchronize(DEVICE)
        return out

    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def bench_forward(benchmark, backend, shape):
    x, w, y = _problem(shape)
    loss = benchmark(_synced(lambda: ak.margin_softmax_loss(x, w, y, backend=backend)))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def bench_backward(benchmark, backend, shape):
    x, w, y = _problem(shape)

    def setup():
        x.grad = w.grad = None
        return (ak.margin_softmax_loss(x, w, y, backend=backend),), {}

    benchmark.pedantic(_synced_backward, setup=setup, rounds=5 if DEVICE.type == "cuda" else 1)
    assert torch.isfinite(w.grad).all()


def _synced_backward(loss):
    loss.backward()
    synchronize(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def bench_forward_backward(benchmark, backend, shape):
    x, w, y = _problem(shape)

    def step():
        x.grad = w.grad = None
        ak.margin_softmax_loss(x, w, y, backend=backend).backward()

    benchmark(_synced(step))
    assert torch.isfinite(x.grad).all()
