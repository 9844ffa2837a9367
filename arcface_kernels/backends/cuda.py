"""The `cuda` backend: the compiled extension `arcface_kernels._C` (csrc/), registered with the
torch dispatcher as torch.ops.arcface_kernels_cuda.{partial_stats, backward}.

cuBLAS GEMMs on class chunks (through ATen) with fused epilogue kernels; see
docs/backends/cuda.md. Importing this module never fails: without the extension the backend
reports why.
"""

import torch

from ..dtypes import KERNEL_DTYPES
from .contract import Backend, PartialStats
from .registry import register_backend

try:
    from .. import _C  # noqa: F401  (loading it registers the ops)

    _LOAD_ERROR = None
except ImportError as err:
    _LOAD_ERROR = f"extension not built ({err})"


def _available(device):
    if _LOAD_ERROR is not None:
        return False, _LOAD_ERROR
    if device.type != "cuda":
        return False, "needs a CUDA device"
    return True, ""


def forward(x, w, labels, options, norms):  # the extension computes its own norms
    stats = torch.ops.arcface_kernels_cuda.partial_stats(
        x, w, labels, options.m1, options.m2, options.m3, options.scale, options.sub_centers, options.easy_margin)
    return PartialStats(*stats)


def backward(grad_rows, x, w, labels, lse, options, num_classes, norms):
    return torch.ops.arcface_kernels_cuda.backward(
        grad_rows, x, w, labels, options.m1, options.m2, options.m3, lse, options.scale, options.sub_centers,
        options.easy_margin, options.straight_through, options.label_smoothing, num_classes)


register_backend(Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    available=_available,
    dtypes=KERNEL_DTYPES,
    # above triton and torch on a GPU: to be confirmed by measurement (docs/backends/cuda.md)
    priority=lambda device: 20 if device.type == "cuda" else -1,
))
