"""The `triton` backend: fused forward and backward kernels, no N x C tensor.

forward.py computes per-split partial statistics and combines them; backward.py recomputes
the cosine tiles for dX and dW; tiles.py and math.py hold the shared tile and margin math;
configs.py the tile sizes. On a CPU it runs only under TRITON_INTERPRET=1 (for tests).
"""

import os

import torch
import triton

from ...dtypes import KERNEL_DTYPES
from ..common import projection_scale
from ..contract import Backend
from ..registry import register_backend
from .backward import grad_w_kernel, grad_x_kernel
from .configs import column_chunks, tile_config
from .forward import combine_splits, partial_stats_kernel

# Enough programs to fill a GPU several times over (132 SMs on an H100); under the interpreter
# a few, so that small test problems still walk several class tiles per split.
_TARGET_PROGRAMS = 4 * 132
_INTERPRETER_TARGET_PROGRAMS = 4
# Bound on the float32 dX partials of the class splits (N x D x splits).
_DX_PARTIAL_BYTES = 32 * 2**20


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _available(device):
    if device.type == "cuda":
        return True, ""
    if _interpreted():
        return True, ""
    return False, "needs a CUDA device (or TRITON_INTERPRET=1 for tests on the CPU)"


def _dot_precision(dtype):
    """float32 dots use tf32 only where torch's own matmul setting allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreted():
        return "tf32"
    return "ieee"


def _grad_dot_options(dtype):
    """float16 gradient tiles can overflow float16: their dots take float32 operands, as tf32 on
    a GPU (backward.grad_dot); bfloat16 has float32's range and keeps bfloat16 operands."""
    if dtype == torch.bfloat16:
        return dict(GRAD_DOT_FP32=False, GRAD_PRECISION="ieee")
    tf32 = dtype == torch.float16 or torch.backends.cuda.matmul.allow_tf32
    return dict(GRAD_DOT_FP32=True, GRAD_PRECISION="tf32" if tf32 and not _interpreted() else "ieee")


def _class_splits(row_blocks, n_classes, block_n, max_splits=None):
    """(classes per split, splits): enough programs to fill the GPU, whole tiles per split."""
    target = _INTERPRETER_TARGET_PROGRAMS if _interpreted() else _TARGET_PROGRAMS
    splits = max(1, min(triton.cdiv(target, row_blocks), triton.cdiv(n_classes, block_n)))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    per_split = triton.cdiv(triton.cdiv(n_classes, splits), block_n) * block_n
    return per_split, triton.cdiv(n_classes, per_split)


def _launch_options(config, backward=False):
    options = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                   num_warps=config.num_warps, num_stages=config.num_stages)
    if backward:
        options["BLOCK_DOUT"] = config.block_dout
    return options


def forward(x, w, labels, options, norms):
    n, dim = x.shape
    k = options.sub_centers
    n_classes = w.shape[0] // k
    rx, rw = norms
    config = tile_config("forward", _interpreted())
    row_blocks = triton.cdiv(n, config.block_m)
    per_split, splits = _class_splits(row_blocks, n_classes, config.block_n)
    stats = torch.empty(6, splits, n, dtype=torch.float32, device=x.device)
    best_class = torch.empty(splits, n, dtype=torch.int64, device=x.device)
    partial_stats_kernel[(row_blocks, splits)](
        x, w, rx, rw, labels, options.m1, options.m2, options.m3, stats, best_class,
        n, n_classes, dim, x.stride(0), w.stride(0), per_split, options.scale,
        K=k, EASY_MARGIN=options.easy_margin, DOT_PRECISION=_dot_precision(x.dtype), **_launch_options(config),
    )
    return combine_splits(stats, best_class)


def backward(grad_rows, x, w, labels, lse, options, num_classes, norms):
    n, dim = x.shape
    k = options.sub_centers
    m1, m2, m3 = options.m1, options.m2, options.m3
    n_classes = w.shape[0] // k
    rx, rw = norms
    grad_rows, lse = grad_rows.float().contiguous(), lse.float().contiguous()
    smoothing, per_class = options.label_smoothing, options.label_smoothing / num_classes
    common = dict(K=k, EASY_MARGIN=options.easy_margin, STRAIGHT_THROUGH=options.straight_through,
                  DOT_PRECISION=_dot_precision(x.dtype), **_grad_dot_options(x.dtype))
    interpreted = _interpreted()

    config = tile_config("grad_x", interpreted)
    row_blocks = triton.cdiv(n, config.block_m)
    max_splits = max(1, _DX_PARTIAL_BYTES // max(1, n * dim * 4))
    per_split, splits = _class_splits(row_blocks * column_chunks(dim, config), n_classes, config.block_n,
                                      max_splits)
    dx_partial = torch.empty(splits, n, dim, dtype=torch.float32, device=x.device)
    grad_x_kernel[(row_blocks, splits, column_chunks(dim, config))](
        x, w, rx, rw, projection_scale(rx), labels, m1, m2, m3, lse, grad_rows, dx_partial,
        n, n_classes, dim, x.stride(0), w.stride(0), per_split, options.scale, smoothing, per_class,
        **common, **_launch_options(config, backward=True),
    )
    dx = dx_partial.sum(dim=0)  # fixed order: deterministic

    config = tile_config("grad_w", interpreted)
    dw = torch.empty_like(w)
    grad_w_kernel[(triton.cdiv(n_classes, config.block_n), k, column_chunks(dim, config))](
        x, w, rx, rw, projection_scale(rw), labels, m1, m2, m3, lse, grad_rows, dw,
        n, n_classes, dim, x.stride(0), w.stride(0), dw.stride(0), options.scale, smoothing, per_class,
        torch.finfo(w.dtype).max,
        **common, **_launch_options(config, backward=True),
    )
    return dx, dw


register_backend(Backend(
    name="triton",
    forward=forward,
    backward=backward,
    available=_available,
    dtypes=KERNEL_DTYPES,
    # on a GPU above the torch backend; on the CPU the interpreter is for tests only
    priority=lambda device: 10 if device.type == "cuda" else -1,
))
