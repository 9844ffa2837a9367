"""Coming from pytorch-metric-learning (PML) or insightface's arcface_torch.

compat.pml: drop-in ArcFaceLoss / CosFaceLoss / SubCenterArcFaceLoss (PML's interface, the
fused op's loss) and from_pml / to_pml (PML losses <-> this library's heads). PML stays an
optional dependency: it is imported when compat.pml, from_pml or to_pml is first used.

compat.insightface: from_insightface (its PartialFC_V2 shards and CombinedMarginLoss), gather_shards
and reshard (any world size), global_loss (the sharded loss as insightface reports it).

PML keeps W as (D, C*K), column c*K + k being sub-centre k of class c, and takes the ArcFace
margin in degrees (radians after construction); the heads keep weight as (C*K, D) in the same
class-major order, so a PML W is the weight transposed, and margins are radians.
"""

from .insightface import from_insightface, gather_shards, global_loss, insightface_margins, reshard

_PML_NAMES = ("from_pml", "to_pml")

__all__ = ["from_pml", "to_pml", "from_insightface", "gather_shards", "reshard", "global_loss", "insightface_margins"]


def __getattr__(name):
    if name in _PML_NAMES:
        from . import pml

        return getattr(pml, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
