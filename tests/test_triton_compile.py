"""Every tile config the triton backend can choose compiles for sm_80 and sm_90 (no GPU needed),
uses wgmma on sm_90, and does not spill registers to local memory."""

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
    if arch == 90:
        assert "wgmma" in compiled.asm["ptx"], "the sm_90 kernel does not use wgmma"
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage


def test_float16_gradient_path_compiles_without_spills():
    # float16 takes the float32-operand (tf32) gradient dots (backward.grad_dot)
    for kernel in ("grad_x", "grad_w"):
        usage = resource_usage(compile_kernel(kernel, CONFIGS[kernel], 90, dtype="fp16"), 90)
        assert usage["spill_stores"] == 0, (kernel, usage)
