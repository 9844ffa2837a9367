"""Where the backend suite runs: on the GPU when there is one, else on the CPU."""

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.registry import FUSED_BACKEND_NAMES

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# Every fused backend that runs on DEVICE; backends added later join the suite unchanged.
BACKENDS = [name for name in FUSED_BACKEND_NAMES if ak.backend_status(name, DEVICE)[0]]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE
