"""arcface_kernels: fused margin-softmax losses (ArcFace, CosFace, SphereFace, the adaptive AdaFace,
ElasticFace, MagFace, and CurricularFace, MV-Softmax) that never materialize the N x C logits.

api.py (margin_softmax_loss) -> op.py (the torch.library op) -> backends/ (registry, then
reference, chunked torch, triton, cuda). options.py holds the settings, validation.py the input
rules, dtypes.py the dtype rules. docs/design.md has the math.
"""

from .api import MarginLossStats, arcface_loss, cosface_loss, loss_from_options, margin_softmax_loss, sphereface_loss
from .backends import backend_status, get_workspace_budget, resolve, resolve_backend, workspace_budget
from .heads import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, SphereFaceLoss, SubCenterArcFaceLoss
from .margin_heads import AdaFaceLoss, CurricularFaceLoss, ElasticFaceLoss, MagFaceLoss, MVSoftmaxLoss
from .options import LossOptions
from .predict import topk_classes

__version__ = "0.1.0"

__all__ = [
    "margin_softmax_loss", "arcface_loss", "cosface_loss", "sphereface_loss", "loss_from_options", "LossOptions",
    "MarginLossStats", "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "SubCenterArcFaceLoss", "CombinedMarginLoss",
    "AdaFaceLoss", "ElasticFaceLoss", "MagFaceLoss", "CurricularFaceLoss", "MVSoftmaxLoss",
    "topk_classes",
    "backend_status", "resolve", "resolve_backend", "workspace_budget", "get_workspace_budget",
]
