"""Every tile config the triton backend can choose compiles for sm_80 and sm_90 (no GPU needed)
with the JIT's runtime specialization: tensor-core instructions (wgmma on sm_90, mma.sync on
sm_80), pipelined asynchronous loads, and no register spills."""

import pytest

pytest.importorskip("triton")

from arcface_kernels.backends.triton.configs import CONFIGS  # noqa: E402
from triton_build import compile_kernel, resource_usage  # noqa: E402


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", sorted(CONFIGS))
def test_config_compiles_without_spills(kernel, arch):
    config = CONFIGS[kernel]
    compiled = compile_kernel(kernel, config, arch, dtype="bf16")
    usage = resource_usage(compiled, arch)
    print(f"{kernel} sm_{arch} {config}: {usage}, shared {compiled.metadata.shared} bytes")
    ptx = compiled.asm["ptx"]
    if arch == 90:
        assert "wgmma" in ptx, "the sm_90 kernel does not use wgmma"
    else:
        assert "mma.sync" in ptx, "the sm_80 kernel does not use mma.sync"
    assert "cp.async" in ptx, "the K-loop loads are not asynchronous (no cp.async / TMA)"
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage


def test_float16_gradient_tile_compiles_without_spills():
    # float16 inputs: float16 cosine dots, bfloat16 gradient tile (chunk_plan.grad_dtype)
    usage = resource_usage(compile_kernel("grad_tile", CONFIGS["grad_tile"], 90, dtype="fp16"), 90)
    assert usage["spill_stores"] == 0, usage
