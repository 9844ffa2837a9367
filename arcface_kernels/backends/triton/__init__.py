"""The `triton` backend: fused Triton kernels, no N x C tensor.

forward.py computes per-split partial statistics and combines them; backward.py writes the
gradient tile of a class chunk for the shared chunk plan (../chunk_plan.py), which runs the two
gradient GEMMs; tiles.py and math.py hold the shared tile and margin math; configs.py the tile
sizes. On a CPU it runs only under TRITON_INTERPRET=1 (for tests).
"""

import contextlib
import os

import torch
import triton

from ...dtypes import KERNEL_DTYPES
from ...negatives import kernel_tensors
from ..chunk_plan import chunked_backward, gradient_dtype
from ..common import float32_matmul_uses_tf32
from ..contract import Backend, PartialStats
from ..registry import register_backend
from .backward import grad_tile_kernel, project_rows_kernel
from .configs import register_cap, tile_config
from .forward import combine_splits, partial_stats_kernel

# Under the interpreter the grid is sized for a wave of a few programs, so that small test problems
# get several class splits and still walk several class tiles per split.
_INTERPRETER_WAVE = 8
# The forward's grid is at most this many waves: more splits only add combine work.
_MAX_FORWARD_WAVES = 4


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _available(device):
    if device.type == "cuda":
        return True, ""
    if _interpreted():
        return True, ""
    return False, "needs a CUDA device (or TRITON_INTERPRET=1 for tests on the CPU)"


def _priority(device, dtype):
    if device.type != "cuda":
        return -1
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
        return 5
    return 30


def _dot_precision(dtype):
    """float32 dots use tf32 only where torch's own matmul setting allows it."""
    if dtype == torch.float32 and not _interpreted() and float32_matmul_uses_tf32():
        return "tf32"
    return "ieee"


def class_splits(row_blocks, n_classes, block_n, wave):
    """(classes per split, splits) of the forward grid (row_blocks x splits programs, whole class
    tiles per split) for a GPU that runs `wave` programs at once: the split count whose longest
    program walks the fewest tiles in all its waves, ceil(programs / wave) x tiles per split (the
    fewest splits among equals), so that the grid fills whole waves (docs/backends/triton.md)."""
    tiles = triton.cdiv(n_classes, block_n)
    best = None
    for splits in range(1, min(tiles, triton.cdiv(_MAX_FORWARD_WAVES * wave, row_blocks)) + 1):
        per_split = triton.cdiv(tiles, splits)
        cost = triton.cdiv(row_blocks * triton.cdiv(tiles, per_split), wave) * per_split
        if best is None or cost < best[0]:
            best = (cost, per_split * block_n)
    per_split = best[1]
    return per_split, triton.cdiv(n_classes, per_split)


def ctas_per_sm(registers, shared, num_warps, props):
    """Programs of a compiled kernel (registers per thread, shared bytes) that one SM holds: the
    register file is allocated in units of 8 registers per thread, each CTA also takes 1 KiB of
    shared memory the driver reserves."""
    threads = 32 * num_warps
    by_registers = props.regs_per_multiprocessor // (triton.cdiv(registers, 8) * 8 * threads)
    by_shared = props.shared_memory_per_multiprocessor // (shared + 1024)
    return max(1, min(by_registers, by_shared, props.max_threads_per_multi_processor // threads))


def _forward_wave(compile_args, config, device):
    """Forward programs the device runs at once, from the kernel compiled for these arguments
    (the JIT's own specialization and cache: the launch that follows reuses it)."""
    if _interpreted():
        return _INTERPRETER_WAVE
    args, kwargs = compile_args
    compiled = partial_stats_kernel.warmup(*args, grid=(1,), **kwargs)
    compiled._init_handles()  # loads the cubin: n_regs is known from then on
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count * ctas_per_sm(compiled.n_regs, compiled.metadata.shared, config.num_warps,
                                                     props)


def _launch_options(config):
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)


def _on_device(device):
    """Launch on the inputs' GPU even when another one is current (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(x, w, labels, options, norms):
    n, dim = x.shape
    k = options.sub_centers
    n_classes = w.shape[0] // k
    rx, rw = norms
    if n == 0:
        empty = rx.new_empty(0)
        return PartialStats(*[empty] * 6, labels.new_empty(0))
    config = tile_config("forward", _interpreted())
    row_blocks = triton.cdiv(n, config.block_m)
    threshold, coeffs = kernel_tensors(options.negatives)  # None, None: NONTARGET=False
    kwargs = dict(K=k, NONTARGET=threshold is not None, EASY_MARGIN=options.easy_margin, CLIP_EPS=options.clip or 0.0,
                  SMOOTHING=options.label_smoothing > 0, DOT_PRECISION=_dot_precision(x.dtype),
                  **_launch_options(config))

    def arguments(stats, best_class, per_split):
        return (x, w, rx, rw, labels, options.m1, options.m2, options.m3, threshold, coeffs, stats, best_class,
                n, n_classes, dim, x.stride(0), w.stride(0), per_split, options.scale)

    with _on_device(x.device):
        # The occupancy decides the split size, so the compile comes first: outputs as dtypes
        # (the JIT's warmup), one tile per split (any whole number of tiles specializes alike).
        wave = _forward_wave((arguments(torch.float32, torch.int64, config.block_n), kwargs), config, x.device)
        per_split, splits = class_splits(row_blocks, n_classes, config.block_n, wave)
        stats = torch.empty(7, splits, n, dtype=torch.float32, device=x.device)
        best_class = torch.empty(splits, n, dtype=torch.int64, device=x.device)
        partial_stats_kernel[(row_blocks, splits)](*arguments(stats, best_class, per_split), **kwargs)
    return combine_splits(stats, best_class)


def backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype):
    n, dim = x.shape
    k = options.sub_centers
    config = tile_config("grad_tile", _interpreted())
    grad_rows, lse, target_dcos = (t.float().contiguous() for t in (grad_rows, lse, target_dcos))
    threshold, coeffs = kernel_tensors(options.negatives)  # None, None: NONTARGET=False

    def fill_grad(first, stop, out):
        if n == 0:
            return
        grid = (triton.cdiv(n, config.block_m), triton.cdiv(stop - first, config.block_n))
        grad_tile_kernel[grid](
            x, w, norms.rx, norms.rw, labels, lse, grad_rows, target_dcos, threshold, coeffs, out,
            n, first, stop, dim, x.stride(0), w.stride(0), out.stride(0), options.scale,
            options.label_smoothing / num_classes,
            K=k, NONTARGET=threshold is not None, DOT_PRECISION=_dot_precision(x.dtype), **_launch_options(config),
            **register_cap("grad_tile", threshold is not None),
        )

    with _on_device(x.device):
        return chunked_backward(x, w, norms, k, gradient_dtype(x.dtype), fill_grad, dw_dtype, align=config.block_n,
                                project=project_rows)


def projection_blocks(dim):
    """(BLOCK_R, BLOCK_D) of project_rows_kernel: whole rows, about 4,096 entries per program."""
    block_d = triton.next_power_of_2(dim)
    return max(1, 4096 // block_d), block_d


def project_rows(grad, v, factor, out):
    """chunk_plan.project_rows as one fused kernel (float32 grad, rows of v, out in any dtype)."""
    rows, dim = grad.shape
    if rows == 0:
        return
    block_r, block_d = projection_blocks(dim)
    project_rows_kernel[(triton.cdiv(rows, block_r),)](
        grad, v, factor, out, rows, dim, grad.stride(0), v.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_D=block_d,
    )


register_backend(Backend(
    name="triton",
    forward=forward,
    backward=backward,
    available=_available,
    dtypes=KERNEL_DTYPES,
    # On a GPU first: the cost models predict it fastest at every headline shape (bench/cost_model.py,
    # docs/backends/triton.md and cuda.md), until measurements say otherwise.
    # On the CPU the interpreter is for tests only. bf16 below sm_80: Triton compiles the dot to
    # scalar FMAs (no bf16 tensor cores), so after `cuda` and `torch` (cuBLAS).
    priority=_priority,
))
