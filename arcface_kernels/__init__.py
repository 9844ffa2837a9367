"""arcface_kernels: fused margin-softmax losses (ArcFace, CosFace, SphereFace) that never
materialize the N x C logits."""

from . import torch_chunked  # noqa: F401  (registers the `torch` backend)
from ._optional_backends import load_optional_backends
from .api import MarginLossStats, arcface_loss, cosface_loss, margin_softmax_loss, sphereface_loss
from .heads import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, SphereFaceLoss
from .predict import topk_classes
from .registry import backend_status, resolve_backend
from .torch_chunked import get_workspace_budget, workspace_budget

__version__ = "0.1.0"

load_optional_backends()

__all__ = [
    "margin_softmax_loss", "arcface_loss", "cosface_loss", "sphereface_loss", "MarginLossStats",
    "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "CombinedMarginLoss", "topk_classes",
    "backend_status", "resolve_backend", "workspace_budget", "get_workspace_budget",
]
