"""The `cuda` backend: the compiled extension `arcface_kernels._C` (csrc/), registered with the
torch dispatcher as torch.ops.arcface_kernels_cuda.{partial_stats, grad_chunk}.

Forward walks the classes in chunks: a cuBLAS GEMM to float32 dot products, then epilogue
kernels fold each chunk into the row statistics. Backward is the shared chunk plan
(chunk_plan.chunked_backward) with this backend's gradient tile (grad_chunk: the same GEMM, then
an epilogue that writes G). See docs/backends/cuda.md. Importing this module never fails: without
the extension, or on a GPU the build carries no code for, the backend reports why.
"""

from typing import NamedTuple

import torch

from ..dtypes import KERNEL_DTYPES, saturating_cast
from .common import classes_per_chunk, get_workspace_budget, projection_scale
from .contract import Backend, PartialStats
from .registry import register_backend


class GpuCode(NamedTuple):
    """What the extension was compiled for, as 10 * major + minor."""

    sass: tuple  # architectures with machine code (SASS)
    ptx: int  # the architecture whose PTX is embedded for newer GPUs to JIT; 0 if none


_LOAD_ERROR, BUILT_FOR = None, None
try:
    from .. import _C  # loading it registers the ops
except ImportError as err:
    _LOAD_ERROR = f"extension not built ({err})"
else:
    if hasattr(_C, "SASS_ARCHS"):
        BUILT_FOR = GpuCode(tuple(_C.SASS_ARCHS), _C.PTX_ARCH)
    else:
        _LOAD_ERROR = "the extension is from an older build of csrc/: rebuild it"


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
    stats = torch.ops.arcface_kernels_cuda.partial_stats(
        x, w, labels, options.m1, options.m2, options.m3, norms.rx, norms.rw, options.scale, options.sub_centers,
        options.easy_margin, get_workspace_budget())
    return PartialStats(*stats)


def grad_dtype(dtype):
    """The dtype of the gradient tile G and of the gradient GEMMs' operands. bfloat16 for bfloat16
    and float16 inputs: tensor cores, and float32's range (G can exceed float16's: dphi/dc grows
    like 1 / sin(theta), inverse norms like 1 / |v|; float16 operands are rounded to bfloat16,
    about 2e-3 relative error in the gradients). float32 inputs keep float32 (tf32 where torch's
    matmul setting allows it)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _mm32(a, b):
    """a @ b with float32 output (tensor cores for bf16 operands)."""
    return a @ b if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)


def backward(grad_rows, x, w, labels, lse, options, num_classes, norms):
    # Interim chunk walk (docs/design.md section 5), to be replaced by chunk_plan.chunked_backward.
    k, (n, dim) = options.sub_centers, x.shape
    g_dtype = grad_dtype(x.dtype)
    x_operand = x.to(g_dtype)
    step = classes_per_chunk(max(n, 1) * k * (4 + g_dtype.itemsize))
    b = torch.zeros(n, dim, dtype=torch.float32, device=x.device)
    dw = torch.empty_like(w)
    for first in range(0, w.shape[0] // k, step):
        rows = slice(first * k, min(first + step, w.shape[0] // k) * k)
        w_rows = w[rows]
        g = torch.empty(n, w_rows.shape[0], dtype=g_dtype, device=x.device)
        torch.ops.arcface_kernels_cuda.grad_chunk(
            x, w_rows, labels, options.m1, options.m2, options.m3, norms.rx, norms.rw[rows], lse, grad_rows, g,
            first, options.scale, k, options.easy_margin, options.straight_through, options.label_smoothing,
            num_classes)
        b += _mm32(g, w_rows.to(g_dtype))
        a = _mm32(g.T, x_operand)
        w32 = w_rows.float()
        a -= (projection_scale(norms.rw[rows]) * (w32 * a).sum(1))[:, None] * w32
        dw[rows] = saturating_cast(a, w.dtype)
    x32 = x.float()
    return b - (projection_scale(norms.rx) * (x32 * b).sum(1))[:, None] * x32, dw


register_backend(Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    available=_available,
    dtypes=KERNEL_DTYPES,
    # above triton and torch on a GPU: to be confirmed by measurement (docs/backends/cuda.md)
    priority=lambda device: 20 if device.type == "cuda" else -1,
))
