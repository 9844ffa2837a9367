"""Every tile config the triton backend can choose compiles for sm_80 and sm_90 (no GPU needed)
with the JIT's runtime specialization: tensor-core instructions (wgmma on sm_90, mma.sync on
sm_80), pipelined asynchronous loads, no register spills, and the forward at two CTAs per SM."""

import pytest

pytest.importorskip("triton")

from test_triton_grid import A100, H100  # noqa: E402

from arcface_kernels.backends import triton as triton_backend  # noqa: E402
from arcface_kernels.backends.triton.configs import CONFIGS  # noqa: E402
from triton_build import compile_kernel, compile_projection, resource_usage, specialized_arguments  # noqa: E402

PROPS = {90: H100, 80: A100}


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", sorted(CONFIGS))
def test_config_compiles_without_spills(kernel, arch):
    config = CONFIGS[kernel]
    compiled = compile_kernel(kernel, config, arch)
    usage = resource_usage(compiled, arch)
    ctas = triton_backend.ctas_per_sm(usage["registers"], compiled.metadata.shared, config.num_warps, PROPS[arch])
    print(f"{kernel} sm_{arch} {config}: {usage}, shared {compiled.metadata.shared} bytes, {ctas} CTAs/SM")
    ptx = compiled.asm["ptx"]
    if arch == 90:
        assert "wgmma" in ptx, "the sm_90 kernel does not use wgmma"
    else:
        assert "mma.sync" in ptx, "the sm_80 kernel does not use mma.sync"
    assert "cp.async" in ptx, "the K-loop loads are not asynchronous (no cp.async / TMA)"
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    if kernel == "forward":  # one CTA's epilogue runs under another's MMAs (docs/backends/triton.md)
        assert ctas >= 2, (usage, compiled.metadata.shared)


@pytest.mark.parametrize("arch", [90, 80])
def test_forward_with_label_smoothing_compiles_without_spills(arch):
    # the logit sum is a kernel variant of its own (SMOOTHING), with more live values
    config = CONFIGS["forward"]
    compiled = compile_kernel("forward", config, arch, smoothing=True)
    usage = resource_usage(compiled, arch)
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert triton_backend.ctas_per_sm(usage["registers"], compiled.metadata.shared, config.num_warps,
                                      PROPS[arch]) >= 2, usage


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("out_dtype", ["bf16", "fp32"])  # a chunk's dW rows, dX
def test_projection_compiles_without_spills(arch, out_dtype):
    compiled = compile_projection(arch, out_dtype)
    usage = resource_usage(compiled, arch)
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert {"R", "D", "stride_grad", "stride_v", "stride_out"} <= specialized_arguments(compiled)


def test_float16_gradient_tile_compiles_without_spills():
    # float16 inputs: float16 cosine dots, bfloat16 gradient tile (chunk_plan.grad_dtype)
    usage = resource_usage(compile_kernel("grad_tile", CONFIGS["grad_tile"], 90, dtype="fp16"), 90)
    assert usage["spill_stores"] == 0, usage


POINTERS = {"x_ptr", "w_ptr", "rx_ptr", "rw_ptr", "labels_ptr"}


@pytest.mark.parametrize("kernel, integers", [
    ("forward", {"N", "C", "D", "stride_x", "stride_w", "classes_per_split"}),
    ("grad_tile", {"N", "first_class", "stop_class", "D", "stride_x", "stride_w", "stride_g"}),
])
def test_compile_is_specialized_as_the_jit_specializes_the_launch(kernel, integers):
    """At the headline shape every pointer and every integer argument is a multiple of 16: the
    JIT's binder marks them all divisible by 16 (floats never)."""
    compiled = compile_kernel(kernel, CONFIGS[kernel], 90)
    assert POINTERS | integers <= specialized_arguments(compiled)
    assert not {"scale", "smoothing_per_class"} & specialized_arguments(compiled)


def test_a_row_count_off_16_is_not_marked():
    headline = compile_kernel("forward", CONFIGS["forward"], 90)
    odd = compile_kernel("forward", CONFIGS["forward"], 90, shape=(4095, 262144, 512))
    assert specialized_arguments(odd) == specialized_arguments(headline) - {"N"}


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", sorted(CONFIGS))
def test_nontarget_variant_compiles_without_spills(kernel, arch):
    """The non-target epilogue's NONTARGET variant (configs.register_cap included): no spills and
    at least two CTAs per SM, as the plain kernels."""
    config = CONFIGS[kernel]
    compiled = compile_kernel(kernel, config, arch, nontarget=True)
    usage = resource_usage(compiled, arch)
    ctas = triton_backend.ctas_per_sm(usage["registers"], compiled.metadata.shared, config.num_warps, PROPS[arch])
    print(f"{kernel} NONTARGET sm_{arch}: {usage}, {ctas} CTAs/SM")
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert ctas >= 2, usage


@pytest.mark.parametrize("kernel", sorted(CONFIGS))
def test_the_plain_kernels_take_no_argument_of_the_epilogue(kernel):
    """The plain launch passes None for the threshold and coefficient pointers: JIT constants, so
    the plain kernel's parameters are the NONTARGET variant's less those two."""
    def parameters(compiled):
        return compiled.asm["ptx"].count(".param .")

    plain = compile_kernel(kernel, CONFIGS[kernel], 90)
    assert parameters(plain) == parameters(compile_kernel(kernel, CONFIGS[kernel], 90, nontarget=True)) - 2
    assert plain.src.signature["threshold_ptr"] == plain.src.signature["coeffs_ptr"] == "constexpr"
