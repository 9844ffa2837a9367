"""`auto` on a GPU without bf16 tensor cores (below sm_80): Triton compiles a bf16 dot to scalar
FMAs there, so `auto` ranks `triton` below `cuda` and `torch` for bf16 inputs (faked
capabilities, no GPU needed, as tests/test_cuda_archs.py)."""

import importlib

import pytest
import torch

from arcface_kernels.backends import registry, resolve

pytest.importorskip("triton")
cuda_backend = importlib.import_module("arcface_kernels.backends.cuda")
GPU = torch.device("cuda")


@pytest.fixture
def capability(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_LOAD_ERROR", None)
    monkeypatch.setattr(cuda_backend, "BUILT_FOR", cuda_backend.GpuCode((75, 80, 86, 89, 90), 90))
    importlib.import_module("arcface_kernels.backends.triton")
    assert "triton" in registry._BACKENDS

    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


@pytest.mark.parametrize("cap,dtype,expected", [
    ((7, 5), torch.bfloat16, "cuda"),    # Turing: no bf16 tensor cores
    ((7, 5), torch.float16, "triton"),   # fp16 has them on sm_75
    ((7, 5), torch.float32, "triton"),
    ((8, 0), torch.bfloat16, "triton"),
    ((9, 0), torch.bfloat16, "triton"),
])
def test_auto_ranks_triton_by_bf16_tensor_cores(capability, cap, dtype, expected):
    capability(*cap)
    assert resolve("auto", GPU, dtype).name == expected


def test_bf16_below_sm80_without_cuda_goes_to_torch(capability, monkeypatch):
    capability(7, 5)
    monkeypatch.setattr(cuda_backend, "_LOAD_ERROR", "not built")
    assert resolve("auto", GPU, torch.bfloat16).name == "torch"
    # an explicit request still gets triton
    assert resolve("triton", GPU, torch.bfloat16).name == "triton"
