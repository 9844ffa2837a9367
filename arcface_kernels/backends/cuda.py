"""The `cuda` backend: the compiled extension `arcface_kernels._C` (csrc/), registered with the
torch dispatcher as torch.ops.arcface_kernels_cuda.{partial_stats, grad_chunk}.

Forward walks the classes in chunks: a cuBLAS GEMM to float32 dot products, then epilogue
kernels fold each chunk into the row statistics. Backward is the shared chunk plan
(chunk_plan.chunked_backward) with this backend's gradient tile (grad_chunk: the same GEMM, then
an epilogue that writes G) and its fused tangent projection (project_rows), in chunks of a
multiple of CLASS_ALIGN classes. See docs/backends/cuda.md. Importing this module never fails: without
the extension, or on a GPU the build carries no code for, the backend reports why.
"""

from typing import NamedTuple

import torch

from ..build_info import extension_status
from ..dtypes import KERNEL_DTYPES
from ..negatives import kernel_tensors
from . import chunk_plan
from .common import get_workspace_budget
from .contract import Backend, PartialStats
from .registry import register_backend


class GpuCode(NamedTuple):
    """What the extension was compiled for, as 10 * major + minor."""

    sass: tuple  # architectures with machine code (SASS)
    ptx: int  # the architecture whose PTX is embedded for newer GPUs to JIT; 0 if none


_LOAD_ERROR, BUILT_FOR = None, None
try:
    from .. import _C  # loading it registers the ops
except ImportError:
    # "not built (why)" or "built but cannot be loaded (the error, the fix)": the health report's words
    _LOAD_ERROR = extension_status()[1]
else:
    if hasattr(_C, "SASS_ARCHS"):
        BUILT_FOR = GpuCode(tuple(_C.SASS_ARCHS), _C.PTX_ARCH)
    else:
        _LOAD_ERROR = "the extension is from an older build of csrc/: rebuild it"


# Chunks hold a multiple of this many classes (csrc/chunk_size.h kClassAlign, exported as
# _C.CLASS_ALIGN): G's and the dots' leading dimensions are then multiples of 16 bytes (cuBLAS's
# TMA kernels) in every chunk but the last.
CLASS_ALIGN = 64


def _sm(arch):
    return f"sm_{arch}"


def runs_on(capability, code: GpuCode) -> tuple:
    """(ok, reason): can a GPU of compute capability (major, minor) run the extension? SASS runs on
    its own architecture and on later minor versions of the same major (sm_80 code on sm_86 and
    sm_89); PTX is JIT-compiled by the driver for any GPU at least as new."""
    major, minor = capability
    arch = 10 * major + minor
    if any(s // 10 == major and s <= arch for s in code.sass):
        return True, ""
    if code.ptx and code.ptx <= arch:
        return True, ""
    carried = ", ".join(map(_sm, code.sass)) or "no architecture"
    ptx = f" and PTX for compute_{code.ptx}" if code.ptx else ""
    return False, (f"the extension carries SASS for {carried}{ptx}, nothing that runs on this {_sm(arch)} GPU "
                   f"(rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")


def _available(device):
    if _LOAD_ERROR is not None:
        return False, _LOAD_ERROR
    if device.type != "cuda":
        return False, "needs a CUDA device"
    return runs_on(torch.cuda.get_device_capability(device), BUILT_FOR)


def forward(x, w, labels, options, norms):
    # options.clip: fallback="clip"'s eps (the kernels' clip specialization), None for the threshold rules
    stats = torch.ops.arcface_kernels_cuda.partial_stats(
        x, w, labels, options.m1, options.m2, options.m3, norms.rx, norms.rw, options.scale, options.sub_centers,
        options.easy_margin, options.clip, *kernel_tensors(options.negatives), get_workspace_budget())
    return PartialStats(*stats)


def backward_budget(n_rows, dim, grad_dtype, split=False):
    """The shared plan's workspace budget, less what grad_chunk's float32 dots (N x chunk * K,
    allocated by the op) take per weight row, so that the whole chunk fits the user's budget."""
    per_row = chunk_plan.workspace_bytes_per_row(max(n_rows, 1), dim, grad_dtype, split)
    return max(1, get_workspace_budget() * per_row // (per_row + 4 * max(n_rows, 1)))


def backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype):
    k = options.sub_centers
    grad_dtype = chunk_plan.gradient_dtype(x.dtype)
    x_rows = x.contiguous()  # once, not per chunk inside the op
    negatives = kernel_tensors(options.negatives)

    def fill_grad(first_class, stop_class, out):
        rows = slice(first_class * k, stop_class * k)
        torch.ops.arcface_kernels_cuda.grad_chunk(
            x_rows, w[rows], labels, norms.rx, norms.rw[rows], lse, grad_rows, target_dcos, out, first_class,
            options.scale, k, options.label_smoothing / num_classes, *negatives)

    budget = backward_budget(*x.shape, grad_dtype, chunk_plan.split_operands(x.dtype))
    return chunk_plan.chunked_backward(x, w, norms, k, grad_dtype, fill_grad, dw_dtype, budget, align=CLASS_ALIGN,
                                       project=project_rows)


def project_rows(grad, v, v_proj, out):
    """chunk_plan.project_rows as one CUDA kernel (csrc/backward.cu: a warp per row, read float32
    grad and v, write out once in its dtype)."""
    torch.ops.arcface_kernels_cuda.project_rows(grad, v, v_proj, out)


register_backend(Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    available=_available,
    dtypes=KERNEL_DTYPES,
    # above triton and torch on a GPU: to be confirmed by measurement (docs/backends/cuda.md)
    priority=lambda device, dtype: 20 if device.type == "cuda" else -1,
))
