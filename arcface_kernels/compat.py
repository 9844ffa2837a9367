"""Weights in and out of pytorch-metric-learning (PML) and insightface's arcface_torch.

PML's ArcFaceLoss / CosFaceLoss / SubCenterArcFaceLoss keep W as (D, C*K), column c*K + k being
sub-centre k of class c, and take the ArcFace margin in degrees (stored as radians after
construction). Our heads keep weight as (C*K, D) with the same class-major order, so a PML W is
our weight transposed; margins are radians. insightface's PartialFC_V2 keeps on each rank a
Parameter `weight` (classes [start, stop) of its shard, D), split like shard_bounds (the first
C % W ranks hold one more class), saved per rank as `softmax_fc_gpu_{rank}.pt` (its state_dict)
or inside `checkpoint_gpu_{rank}.pt` under "state_dict_softmax_fc". The margins are not in those
files: pass insightface's config (margin_list, scale 64).
"""

import math
import os
from collections.abc import Mapping

import torch

from .distributed import ShardedMarginLoss, shard_bounds
from .heads import ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, SubCenterArcFaceLoss
from .options import LossOptions

INSIGHTFACE_CHECKPOINT_KEY = "state_dict_softmax_fc"


def _pml_losses():
    try:
        from pytorch_metric_learning import losses, reducers
    except ImportError as e:
        raise ImportError("compat.from_pml / to_pml need pytorch-metric-learning installed") from e
    return losses, reducers


def from_pml(pml_loss, *, backend="auto"):
    """The head equal to a PML ArcFaceLoss, CosFaceLoss or SubCenterArcFaceLoss, with its weights.

    Same loss on the same batch (PML's mean over rows, its margin rule past pi - m included);
    the weight is a copy of W.T (same dtype and device).
    """
    losses, reducers = _pml_losses()
    for regularizer in ("weight_regularizer", "embedding_regularizer"):
        if getattr(pml_loss, regularizer, None) is not None:
            raise ValueError(f"PML's {regularizer} has no equivalent here; add it to the loss yourself")
    if type(pml_loss.reducer) is not reducers.MeanReducer:
        raise ValueError(f"only PML's default MeanReducer has an equivalent, got {type(pml_loss.reducer).__name__}")
    w = pml_loss.W.detach()
    common = dict(scale=float(pml_loss.scale), backend=backend, device=w.device, dtype=w.dtype)
    # PML converts the ArcFace margin from degrees to radians at construction: .margin is radians.
    if isinstance(pml_loss, losses.SubCenterArcFaceLoss):
        head = SubCenterArcFaceLoss(pml_loss.num_classes, w.shape[0], margin=float(pml_loss.margin),
                                    sub_centers=pml_loss.sub_centers, **common)
    elif isinstance(pml_loss, losses.ArcFaceLoss):
        head = ArcFaceLoss(pml_loss.num_classes, w.shape[0], margin=float(pml_loss.margin), **common)
    elif isinstance(pml_loss, losses.CosFaceLoss):
        head = CosFaceLoss(pml_loss.num_classes, w.shape[0], margin=float(pml_loss.margin), **common)
    else:
        raise TypeError(f"from_pml takes ArcFaceLoss, CosFaceLoss or SubCenterArcFaceLoss, "
                        f"got {type(pml_loss).__name__}")
    with torch.no_grad():
        head.weight.copy_(w.T)
    return head


def to_pml(head):
    """The PML loss equal to an ArcFace, CosFace or sub-centre ArcFace head, with a copy of its
    weights (PML's margin in degrees)."""
    losses, _ = _pml_losses()
    o, k = head.options, head.sub_centers
    defaults = LossOptions()
    differing = [name for name in ("easy_margin", "margin_grad", "label_smoothing", "reduction")
                 if getattr(o, name) != getattr(defaults, name)]
    margins = (o.m1, o.m2, o.m3)
    if differing or any(isinstance(m, torch.Tensor) for m in margins) or o.m1 != 1.0:
        raise ValueError(f"PML has no equivalent of m1 != 1, per-row margins or non-default {differing}")
    size = dict(num_classes=head.num_classes, embedding_size=head.embedding_size, scale=o.scale)
    if o.m3 == 0.0 and k > 1:
        pml_loss = losses.SubCenterArcFaceLoss(margin=math.degrees(o.m2), sub_centers=k, **size)
    elif o.m3 == 0.0:
        pml_loss = losses.ArcFaceLoss(margin=math.degrees(o.m2), **size)
    elif o.m2 == 0.0 and k == 1:
        pml_loss = losses.CosFaceLoss(margin=o.m3, **size)
    else:
        raise ValueError(f"PML has no loss with m2={o.m2}, m3={o.m3}, sub_centers={k}")
    pml_loss.W.data = head.weight.detach().T.clone()
    return pml_loss


def _shard_weight(shard):
    """The weight of one insightface shard: a path, a PartialFC_V2 state_dict (or one of
    ours), or a train_v2 checkpoint holding one."""
    if isinstance(shard, (str, os.PathLike)):
        shard = torch.load(shard, map_location="cpu", weights_only=True)
    if not isinstance(shard, Mapping):
        raise TypeError(f"a shard must be a path or a state_dict, got {type(shard).__name__}")
    if INSIGHTFACE_CHECKPOINT_KEY in shard:
        shard = shard[INSIGHTFACE_CHECKPOINT_KEY]
    if "weight" not in shard:
        raise ValueError(f"no 'weight' in the shard (PartialFC_V2's state_dict key); keys: {sorted(shard)}")
    return shard["weight"]


def gather_shards(shards, *, sub_centers=1):
    """The full (C * sub_centers, D) weight from every rank's shard, given in rank order.

    Checks that the shard sizes are the split of shard_bounds (insightface's), so that shards in
    the wrong order or from another split raise instead of permuting the classes."""
    weights = [_shard_weight(s) for s in shards]
    rows = [w.shape[0] for w in weights]
    if any(r % sub_centers for r in rows):
        raise ValueError(f"shard rows {rows} are not multiples of sub_centers={sub_centers}")
    num_classes, world = sum(rows) // sub_centers, len(rows)
    expected = [(stop - start) * sub_centers for start, stop in
                (shard_bounds(num_classes, world, r) for r in range(world))]
    if rows != expected:
        raise ValueError(f"shard rows {rows} are not the rank-ordered split {expected} of {num_classes} classes")
    return torch.cat([w.detach() for w in weights])


def reshard(weight, world_size, *, sub_centers=1):
    """A full (C * sub_centers, D) weight split into world_size shards (shard_bounds), as a list
    of PartialFC_V2 / ShardedMarginLoss state_dicts ({"weight": shard}), rank order."""
    num_classes = weight.shape[0] // sub_centers
    bounds = (shard_bounds(num_classes, world_size, r) for r in range(world_size))
    return [{"weight": weight[start * sub_centers : stop * sub_centers].detach().clone()} for start, stop in bounds]


def from_insightface(shards, *, scale=64.0, margin_list=(1.0, 0.5, 0.0), sharded=False, process_group=None,
                     **head_options):
    """A head holding the classes of insightface PartialFC_V2 shards (paths or state_dicts, rank order).

    margin_list and scale are insightface's config (m1, m2, m3; the defaults are its ArcFace).
    Its ArcFace path treats dphi/dc as 1: pass margin_grad="straight_through" to train as it does.
    sharded=False: a single-device CombinedMarginLoss with every class. sharded=True: a
    ShardedMarginLoss over process_group (any world size: the classes are re-split for it),
    holding this rank's shard. Other keywords go to the head (sample_rate, backend, ...).
    """
    full = gather_shards(shards)
    m1, m2, m3 = margin_list
    settings = dict(scale=scale, m1=m1, m2=m2, m3=m3, device=full.device, dtype=full.dtype, **head_options)
    if sharded:
        head = ShardedMarginLoss(full.shape[0], full.shape[1], process_group=process_group, **settings)
        local = full[head.class_start : head.class_stop]
    else:
        head = CombinedMarginLoss(full.shape[0], full.shape[1], **settings)
        local = full
    with torch.no_grad():
        head.weight.copy_(local)
    return head
