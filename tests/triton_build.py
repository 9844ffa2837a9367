"""Compile the triton backend's kernels for a GPU that is not here (triton.compile with a
GPUTarget), specialized exactly as the JIT specializes them at launch, and read their resource
usage from the cubin.

The specialization is not guessed: the launch arguments of a shape (pointers as 16-byte aligned
stand-ins for torch's allocations, every integer the value the backend's launch code passes) go
through the JIT's own binder for the target, the code `kernel[grid](...)` runs before it compiles
(triton/runtime/jit.py: create_function_from_signature, then JITFunction.run's packing). So every
pointer and every integer that is a multiple of 16 (N, C, D, the strides, the classes per split,
the chunk bounds) carries tt.divisibility = 16, an integer equal to 1 becomes a constant, and
floats stay unspecialized, as on the GPU.
"""

import functools
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton._utils import find_paths_if, get_iterable_path
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from arcface_kernels.backends import chunk_plan
from arcface_kernels.backends import triton as triton_backend
from arcface_kernels.backends.triton.backward import grad_tile_kernel, project_rows_kernel
from arcface_kernels.backends.triton.configs import register_cap
from arcface_kernels.backends.triton.forward import partial_stats_kernel

KERNELS = {"forward": partial_stats_kernel, "grad_tile": grad_tile_kernel}
HEADLINE = (4096, 262144, 512)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _Pointer:
    """What the JIT's binder reads from a tensor argument: its dtype and its address (torch's
    CUDA allocations are 512-byte aligned)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 1 << 21


def launch_arguments(kernel, shape, dtype="bf16", sub_centers=1, nontarget=False):
    """The positional arguments the backend's launch code passes `kernel` at (N, C, D), pointers
    as stand-ins: the forward's those of its warm-up compile (one tile per split: every split
    size the launch then picks is a whole number of tiles, specialized alike), the gradient
    tile's those of the first chunk of the chunk plan. The non-target epilogue's threshold and
    coefficients are None on the plain path, as the launch passes them."""
    n, c, d = shape
    dt = _DTYPES[dtype]
    x, f32, i64 = _Pointer(dt), _Pointer(torch.float32), _Pointer(torch.int64)
    negatives = (f32, f32) if nontarget else (None, None)
    config = triton_backend.tile_config(kernel)
    if kernel == "forward":
        return (x, x, f32, f32, i64, f32, f32, f32, *negatives, f32, i64, n, c, d, d, d, config.block_n, 64.0)
    grad_dtype = chunk_plan.gradient_dtype(dt)
    step = chunk_plan.chunk_classes(n, c, sub_centers, d, grad_dtype, None, config.block_n,
                                    chunk_plan.split_operands(dt))
    g = _Pointer(grad_dtype)
    return (x, x, f32, f32, i64, f32, f32, f32, *negatives, g, n, 0, step, d, d, d, step * sub_centers, 64.0, 0.0)


def _compile(fn, arch, args, launch_kwargs):
    """fn compiled for sm_`arch` from what `fn[grid](*args, **launch_kwargs)` would bind."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, kwargs = binder(*args, **launch_kwargs)
    # what JITFunction.run does next before it compiles (triton 3.8's _pack_args, inline in 3.6)
    signature = {param.name: spec[0] for param, spec in zip(fn.params, specialization)}
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(list(signature.values()), lambda _, kind: kind == "constexpr")}
    attrvals = ["" if kind == "constexpr" else attr for kind, attr in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, attr: isinstance(attr, str))}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=backend.parse_options(kwargs).__dict__)


@functools.cache
def compile_kernel(kernel, config, arch, dtype="bf16", sub_centers=1, shape=HEADLINE, smoothing=False,
                   nontarget=False):
    """`kernel` with tile config `config`, compiled for sm_`arch` as the JIT would at `shape`
    (cached: several tests read the same compile); nontarget: the non-target epilogue's variant."""
    fn = KERNELS[kernel]
    constants = dict(K=sub_centers, NONTARGET=nontarget, EASY_MARGIN=False, CLIP_EPS=0.0, SMOOTHING=smoothing,
                     DOT_PRECISION="ieee", BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    return _compile(fn, arch, launch_arguments(kernel, shape, dtype, sub_centers, nontarget),
                    dict(constants, num_warps=config.num_warps, num_stages=config.num_stages,
                         **register_cap(kernel, nontarget)))


@functools.cache
def compile_projection(arch, out_dtype="bf16", shape=HEADLINE):
    """project_rows_kernel as the chunk plan launches it at `shape`: a chunk's dW rows (`out_dtype`
    the input dtype) or dX (fp32), D wide; the launch's default warps and stages."""
    n, c, d = shape
    rows = n if out_dtype == "fp32" else chunk_plan.chunk_classes(n, c, 1, d, torch.bfloat16, None, 64)
    block_r, block_d = triton_backend.projection_blocks(d)
    args = (_Pointer(torch.float32), _Pointer(torch.bfloat16), _Pointer(torch.float32), _Pointer(_DTYPES[out_dtype]),
            rows, d, d, d, d)
    return _compile(project_rows_kernel, arch, args, dict(BLOCK_R=block_r, BLOCK_D=block_d))


def specialized_arguments(compiled):
    """Names of the kernel arguments the compile treated as divisible by 16."""
    fn = compiled.src.fn
    return {fn.arg_names[path[0]] for path, attr in compiled.src.attrs.items() if ["tt.divisibility", 16] in attr}


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
