"""The `cuda` backend: the compiled extension `arcface_kernels._C` (csrc/), registered with the
torch dispatcher as torch.ops.arcface_kernels_cuda.{partial_stats, backward}.

cuBLAS GEMMs on class chunks (through ATen) with fused epilogue kernels; see bench/CUDA_NOTES.md.
Importing this module never fails: without the extension the backend reports why.
"""

import torch

from . import torch_chunked
from .registry import KERNEL_DTYPES, Backend, PartialStats, register_backend

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    _LOAD_ERROR = None
except ImportError as err:
    _LOAD_ERROR = f"extension not built ({err})"


def _available(device):
    if _LOAD_ERROR is not None:
        return False, _LOAD_ERROR
    if device.type != "cuda":
        return False, "needs a CUDA device"
    return True, ""


def forward(x, w, labels, m1, m2, m3, cfg):
    if x.dtype not in KERNEL_DTYPES:
        return torch_chunked.forward(x, w, labels, m1, m2, m3, cfg)
    stats = torch.ops.arcface_kernels_cuda.partial_stats(x, w, labels, m1, m2, m3, cfg.scale, cfg.sub_centers,
                                                          cfg.easy_margin)
    return PartialStats(*stats)


def backward(grad_rows, x, w, labels, m1, m2, m3, lse, cfg):
    if x.dtype not in KERNEL_DTYPES:
        return torch_chunked.backward(grad_rows, x, w, labels, m1, m2, m3, lse, cfg)
    return torch.ops.arcface_kernels_cuda.backward(grad_rows, x, w, labels, m1, m2, m3, lse, cfg.scale,
                                                   cfg.sub_centers, cfg.easy_margin, cfg.straight_through,
                                                   cfg.label_smoothing, cfg.num_classes)


register_backend(Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    available=_available,
    # above triton and torch on a GPU: to be confirmed by measurement (bench/CUDA_NOTES.md)
    priority=lambda device: 20 if device.type == "cuda" else -1,
))
