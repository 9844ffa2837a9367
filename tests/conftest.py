"""Where the backend suite runs: on the GPU when there is one, else on the CPU (where the
triton backend joins under TRITON_INTERPRET=1, see test_triton_interpreter.py)."""

import os

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.backends import FUSED_BACKEND_NAMES

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# Every fused backend that runs on DEVICE; backends added later join the suite unchanged.
# ARCFACE_KERNELS_TEST_BACKENDS=triton,cuda keeps only those (bench/gpu.py runs the suite per backend).
_ONLY = [b for b in os.environ.get("ARCFACE_KERNELS_TEST_BACKENDS", "").split(",") if b]
BACKENDS = [name for name in FUSED_BACKEND_NAMES if ak.backend_status(name, DEVICE)[0] and (not _ONLY or name in _ONLY)]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _runnable(request):
    dtype = request.node.callspec.params.get("dtype") if hasattr(request.node, "callspec") else None
    if request.param == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot gives wrong results under the Triton interpreter; bf16 is checked on a GPU")
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    return _runnable(request)


@pytest.fixture(params=BACKENDS + ["reference"])
def any_backend(request):
    """Every fused backend and the materializing reference: the rules every path must keep."""
    return _runnable(request)


@pytest.fixture
def device():
    return DEVICE
