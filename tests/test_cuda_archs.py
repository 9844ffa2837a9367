"""Which GPUs the `cuda` backend runs on: the extension records the architectures it was compiled
for, `available` compares a device's compute capability with them, and `auto` falls back to the
next backend where they do not match. Checked with faked capabilities (no GPU needed)."""

import importlib
import os
import sys

import pytest
import torch

from arcface_kernels.backends import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import setup  # noqa: E402

cuda_backend = importlib.import_module("arcface_kernels.backends.cuda")
GpuCode = cuda_backend.GpuCode
DEFAULT_BUILD = GpuCode((75, 80, 90), 90)


def test_setup_builds_every_generation_and_ptx_for_the_newest():
    assert setup.ARCHS == "7.5;8.0;9.0+PTX"
    assert setup._ptx_arch(setup.ARCHS) == 90
    assert setup._ptx_arch("8.0;9.0") == 0
    assert setup._ptx_arch("8.0+PTX 10.0+PTX") == 100


@pytest.mark.parametrize("capability,code,ok", [
    ((9, 0), DEFAULT_BUILD, True),
    ((7, 5), DEFAULT_BUILD, True),   # Turing (T4)
    ((8, 7), DEFAULT_BUILD, True),   # sm_80 code on a later minor version of the same major
    ((10, 0), DEFAULT_BUILD, True),  # Blackwell: JIT from compute_90 PTX
    ((12, 0), DEFAULT_BUILD, True),
    ((7, 0), DEFAULT_BUILD, False),  # Volta: older than anything carried
    ((8, 6), GpuCode((80, 90), 0), True),
    ((7, 5), GpuCode((80, 90), 0), False),
    ((10, 0), GpuCode((80, 90), 0), False),  # no PTX: nothing runs on a newer major
    ((8, 0), GpuCode((86,), 0), False),  # sm_86 code does not run on sm_80
])
def test_runs_on(capability, code, ok):
    result, reason = cuda_backend.runs_on(capability, code)
    assert result == ok
    assert (reason == "") == ok
    if not ok:
        assert f"sm_{capability[0]}{capability[1]} GPU" in reason and "TORCH_CUDA_ARCH_LIST" in reason, reason


@pytest.fixture
def fake_gpu(monkeypatch):
    """A loaded extension built for DEFAULT_BUILD, on a GPU of the capability given."""
    monkeypatch.setattr(cuda_backend, "_LOAD_ERROR", None)
    monkeypatch.setattr(cuda_backend, "BUILT_FOR", DEFAULT_BUILD)

    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


@pytest.fixture
def without_triton(monkeypatch):
    # triton ranks above cuda on a GPU (its cost model predicts it faster): take it out to see
    # how auto treats cuda
    from arcface_kernels.backends import registry

    monkeypatch.delitem(registry._BACKENDS, "triton", raising=False)


def test_auto_picks_cuda_where_it_runs(fake_gpu, without_triton):
    fake_gpu(9, 0)
    assert resolve("auto", torch.device("cuda"), torch.bfloat16).name == "cuda"


def test_auto_falls_back_where_the_build_cannot_run(fake_gpu, without_triton):
    fake_gpu(7, 0)
    choice = resolve("auto", torch.device("cuda"), torch.bfloat16)
    assert choice.name != "cuda"
    carried = "SASS for sm_75, sm_80, sm_90 and PTX for compute_90"
    assert f"cuda the extension carries {carried}, nothing that runs on this sm_70 GPU" in choice.reason
    with pytest.raises(RuntimeError, match="backend='cuda' is not available on cuda: .*sm_70 GPU"):
        resolve("cuda", torch.device("cuda"), torch.bfloat16)
