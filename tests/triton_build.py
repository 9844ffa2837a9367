"""Compile the triton backend's kernels for a GPU that is not here (triton.compile with a
GPUTarget), with the specialization the JIT applies at run time, and read their resource usage
from the cubin."""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from arcface_kernels.backends.triton.backward import grad_tile_kernel
from arcface_kernels.backends.triton.forward import partial_stats_kernel

KERNELS = {"forward": partial_stats_kernel, "grad_tile": grad_tile_kernel}
_INPUTS = ("x_ptr", "w_ptr")
# Integer arguments that are multiples of 16 at the production shapes (D = 128..512, N a multiple
# of 16, row strides = D): the JIT marks them divisible by 16 at launch, as it does every pointer
# allocated by torch, and that specialization decides vectorized and pipelined loads.
_ALIGNED_INTS = ("N", "D", "stride_x", "stride_w", "stride_g")
_INTS = ("labels_ptr", "best_class_ptr")
_FLOATS = ("scale", "smoothing_per_class")


def _signature(fn, dtype):
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in _INPUTS:
            sig[name] = f"*{dtype}"
        elif name == "g_ptr":  # the gradient tile: float32 for float32 inputs, else bfloat16
            sig[name] = "*fp32" if dtype == "fp32" else "*bf16"
        elif name in _INTS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(kernel, config, arch, dtype="bf16", sub_centers=1):
    fn = KERNELS[kernel]
    constants = dict(K=sub_centers, EASY_MARGIN=False, DOT_PRECISION="ieee",
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature = _signature(fn, dtype)
    # The runtime specialization the JIT applies at launch (tt.divisibility = 16).
    aligned = [name for name, kind in signature.items() if kind.startswith("*") or name in _ALIGNED_INTS]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def resource_usage(compiled, arch):
    """ptxas's report for the kernel's PTX: registers, stack frame, spill store and load bytes."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([tool, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    report = out.stderr
    return dict(
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        stack=int(re.search(r"(\d+) bytes stack frame", report).group(1)),
        spill_stores=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        spill_loads=int(re.search(r"(\d+) bytes spill loads", report).group(1)),
    )
