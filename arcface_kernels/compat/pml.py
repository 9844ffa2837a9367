"""pytorch-metric-learning (PML) drop-ins whose loss and gradients come from the fused op.

    from arcface_kernels.compat.pml import ArcFaceLoss   # instead of pytorch_metric_learning.losses

`ArcFaceLoss`, `CosFaceLoss` and `SubCenterArcFaceLoss` here are subclasses of PML's own
classes (PML 2.x): same constructor (positional `num_classes, embedding_size`, the ArcFace
margin in degrees, `weight_init_func`, `weight_regularizer`, `embedding_regularizer`,
`reducer`, `distance`), same attributes (`W` as a (D, C*K) Parameter, state_dict key `W`,
`margin` in radians after construction, `scale`, `distance`, `reducer`), same forward
(`embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None`, miner weights,
PML's errors), so miners, `MultipleLosses` and `DistributedLossWrapper` take them. Only the
per-row losses change: they come from `margin_softmax_loss(..., reduction="none")`, N x C is
never built, and PML's reducer is applied on top. One extra keyword, `backend` ("auto").

PML's dtype behaviour is kept: each forward casts W's data to the embeddings' dtype and device
with PML's own `cast_types` (outside CUDA autocast), and the loss comes back in the embeddings'
dtype outside autocast (the per-row losses are reduced in float32, or float64, then cast),
float32 under autocast. `get_logits` and `get_outliers` are PML's materializing helpers, in
PML's arithmetic and units (degrees, (D, C) dominant centres). With collect_stats, `avg_angle`
is recorded as PML records it.

What the fused op cannot honour is refused with a ValueError: a distance other than PML's
default `CosineSimilarity()` (p=2, power=1), an ArcFace margin of 90 degrees or more, a CosFace
margin outside (-1, 1), negative labels (PML has no ignore_index).

`from_pml` / `to_pml` convert between these (or PML's own losses) and this library's heads.
"""

import math

import torch

try:
    from pytorch_metric_learning import distances, losses, reducers
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
except ImportError as e:  # PML is an optional dependency: only this module needs it
    raise ImportError("arcface_kernels.compat.pml needs pytorch-metric-learning: "
                      "pip install pytorch-metric-learning") from e

from ..api import margin_softmax_loss
from ..heads import ArcFaceLoss as ArcFaceHead
from ..heads import CosFaceLoss as CosFaceHead
from ..heads import SubCenterArcFaceLoss as SubCenterArcFaceHead
from ..options import LossOptions

# PML reducers with an equivalent `reduction` of the heads (exact types: SumReducer subclasses MeanReducer).
_REDUCTIONS = {reducers.MeanReducer: "mean", reducers.SumReducer: "sum"}


def check_distance(distance, owner):
    """The fused op computes cosines: PML's default CosineSimilarity() (p=2, power=1) only."""
    if type(distance) is not distances.CosineSimilarity or distance.p != 2 or distance.power != 1:
        raise ValueError(
            f"{owner}: the fused op computes the cosine similarity, PML's default CosineSimilarity() "
            f"(p=2, power=1); got {type(distance).__name__}(p={distance.p}, power={distance.power})")


class _FusedLoss:
    """The fused forward shared by the three drop-ins (a mixin in front of PML's class)."""

    sub_centers = 1

    def __init__(self, *args, backend="auto", **kwargs):
        if kwargs.get("distance") is not None:
            check_distance(kwargs["distance"], type(self).__name__)
        super().__init__(*args, **kwargs)
        self.backend = backend
        LossOptions(scale=self.scale, **self.fused_margins())  # scale and margins checked at construction

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        # PML's loss has the embeddings' dtype outside autocast (its cross-entropy runs in W's
        # dtype, cast to the embeddings'), float32 under autocast, like the fused op's.
        if isinstance(loss, torch.Tensor) and not torch.is_autocast_enabled(embeddings.device.type):
            loss = loss.to(embeddings.dtype)
        return loss

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        check_distance(self.distance, type(self).__name__)
        if labels.numel() and bool((labels < 0).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) (PML has no ignore_index), "
                             f"got {int(labels.min())}")
        self.cast_types(embeddings.dtype, embeddings.device)
        out = margin_softmax_loss(embeddings, self.W.t(), labels, scale=float(self.scale),
                                  sub_centers=self.sub_centers, reduction="none", return_stats=self.collect_stats,
                                  backend=self.backend, **self.fused_margins())
        if self.collect_stats:
            rows, stats = out
            self.get_angles(stats.target_cos.detach())   # PML's avg_angle record
        else:
            rows = out
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=rows.dtype)
        loss_dict = {"loss": {"losses": rows * miner_weights, "indices": c_f.torch_arange_from_size(embeddings),
                              "reduction_type": "element"}}
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def get_logits(self, embeddings):
        """scale * cosine to every class, (N, C), materialized as PML does it (its distance, in the
        embeddings' dtype; W is cast for the product, not in place)."""
        w = c_f.to_device(self.W, embeddings, dtype=embeddings.dtype)
        cos = self.distance(embeddings, w.t())
        if self.sub_centers > 1:
            cos = cos.view(-1, self.num_classes, self.sub_centers).amax(dim=2)
        return cos * self.scale


def _angular_margins(loss):
    if not abs(loss.margin) < math.pi / 2:
        raise ValueError(f"{type(loss).__name__}: margin must be below 90 degrees, got {math.degrees(loss.margin):g}")
    return dict(m1=1.0, m2=float(loss.margin), m3=0.0)


class ArcFaceLoss(_FusedLoss, losses.ArcFaceLoss):
    """PML's ArcFaceLoss (margin in degrees, default 28.6) on the fused op."""

    def fused_margins(self):
        return _angular_margins(self)


class SubCenterArcFaceLoss(_FusedLoss, losses.SubCenterArcFaceLoss):
    """PML's SubCenterArcFaceLoss (keyword num_classes / embedding_size, margin in degrees,
    sub_centers=3) on the fused op; get_outliers is PML's (threshold in degrees)."""

    def fused_margins(self):
        return _angular_margins(self)


class CosFaceLoss(_FusedLoss, losses.CosFaceLoss):
    """PML's CosFaceLoss (margin a cosine offset, default 0.35) on the fused op."""

    def fused_margins(self):
        if not abs(self.margin) < 1:
            raise ValueError(f"CosFaceLoss: margin must lie in (-1, 1), got {self.margin}")
        return dict(m1=1.0, m2=0.0, m3=float(self.margin))


# -- conversions ---------------------------------------------------------------------------------

def from_pml(pml_loss, *, backend="auto"):
    """The head equal to a PML ArcFaceLoss, CosFaceLoss or SubCenterArcFaceLoss (PML's own or this
    module's), with a copy of its weights (W.T, same dtype and device).

    Every setting is honoured or refused: margin and scale carried over; the reducer becomes
    `reduction` (MeanReducer -> "mean", SumReducer -> "sum"; others raise); a non-default
    distance, a weight_regularizer or an embedding_regularizer raises (the heads have none).
    """
    if isinstance(pml_loss, losses.SubCenterArcFaceLoss):
        head_class, extra = SubCenterArcFaceHead, dict(sub_centers=pml_loss.sub_centers)
    elif isinstance(pml_loss, losses.ArcFaceLoss):
        head_class, extra = ArcFaceHead, {}
    elif isinstance(pml_loss, losses.CosFaceLoss):
        head_class, extra = CosFaceHead, {}
    else:
        raise TypeError(f"from_pml takes ArcFaceLoss, CosFaceLoss or SubCenterArcFaceLoss, "
                        f"got {type(pml_loss).__name__}")
    check_distance(pml_loss.distance, "from_pml")
    for regularizer in ("weight_regularizer", "embedding_regularizer"):
        if getattr(pml_loss, regularizer) is not None:
            raise ValueError(f"from_pml: PML's {regularizer} has no equivalent in the heads; add to the loss yourself")
    reduction = _REDUCTIONS.get(type(pml_loss.reducer))
    if reduction is None:
        raise ValueError(f"from_pml: PML's {type(pml_loss.reducer).__name__} has no equivalent; the heads take "
                         f"MeanReducer (reduction='mean') or SumReducer (reduction='sum')")
    w = pml_loss.W.detach()
    # PML converts the ArcFace margin from degrees to radians at construction: .margin is radians.
    head = head_class(pml_loss.num_classes, w.shape[0], margin=float(pml_loss.margin), scale=float(pml_loss.scale),
                      reduction=reduction, backend=backend, device=w.device, dtype=w.dtype, **extra)
    with torch.no_grad():
        head.weight.copy_(w.T)
    return head


def to_pml(head, *, fused=False):
    """The PML loss equal to an ArcFace, CosFace or sub-centre ArcFace head, with a copy of its
    weights: PML's own class, or with fused=True this module's drop-in (same state_dict).

    Refused with a ValueError, as PML cannot express them: m1 != 1, both m2 and m3 non-zero,
    per-row margins, easy_margin, margin_grad="straight_through", label_smoothing, a
    non-default ignore_index, reduction="none", Partial FC (sample_rate < 1), a head holding a
    shard of the classes.
    """
    o, k = head.options, head.sub_centers
    if head.weight.shape[0] != head.num_classes * k:
        raise ValueError(f"to_pml: the head holds {head.weight.shape[0]} class rows, not num_classes * sub_centers = "
                         f"{head.num_classes * k} (a shard? build a single-device head with compat.from_insightface)")
    defaults = LossOptions()
    differing = [name for name in ("easy_margin", "margin_grad", "label_smoothing", "ignore_index")
                 if getattr(o, name) != getattr(defaults, name)]
    if o.reduction == "none":
        differing.append("reduction='none'")
    if getattr(head, "sample_rate", 1.0) < 1:
        differing.append("sample_rate < 1 (Partial FC)")
    if differing:
        raise ValueError(f"to_pml: PML has no equivalent of {', '.join(differing)}")
    margins = (o.m1, o.m2, o.m3)
    if any(isinstance(m, torch.Tensor) for m in margins) or o.m1 != 1.0:
        raise ValueError("to_pml: PML has no equivalent of m1 != 1 or per-row margins")
    if fused:
        arcface, cosface, subcenter = ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss
    else:
        arcface, cosface, subcenter = losses.ArcFaceLoss, losses.CosFaceLoss, losses.SubCenterArcFaceLoss
    common = dict(num_classes=head.num_classes, embedding_size=head.embedding_size, scale=o.scale,
                  reducer=reducers.SumReducer() if o.reduction == "sum" else None)
    if fused:
        common["backend"] = head.backend
    if o.m3 == 0.0 and k > 1:
        pml_loss = subcenter(margin=math.degrees(o.m2), sub_centers=k, **common)
    elif o.m3 == 0.0:
        pml_loss = arcface(margin=math.degrees(o.m2), **common)
    elif o.m2 == 0.0 and k == 1:
        pml_loss = cosface(margin=o.m3, **common)
    else:
        raise ValueError(f"to_pml: PML has no loss with m2={o.m2}, m3={o.m3}, sub_centers={k}")
    pml_loss.margin = o.m2 if o.m3 == 0.0 else o.m3   # exactly, not through degrees and back
    pml_loss.W.data = head.weight.detach().T.contiguous()
    return pml_loss
