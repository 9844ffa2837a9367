"""insightface's arcface_torch: its PartialFC_V2 shards in, its CombinedMarginLoss reproduced.

PartialFC_V2 keeps on each rank a Parameter `weight` (classes [start, stop) of its shard, D),
split like shard_bounds (the first C % W ranks hold one more class), saved per rank as
`softmax_fc_gpu_{rank}.pt` (its state_dict) or inside `checkpoint_gpu_{rank}.pt` under
"state_dict_softmax_fc". The margins are not in those files: pass insightface's config
(margin_list, scale 64).
"""

import os
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..distributed import ShardedMarginLoss, shard_bounds
from ..heads import CombinedMarginLoss

INSIGHTFACE_CHECKPOINT_KEY = "state_dict_softmax_fc"
MARGIN_RULES = ("insightface", "combined")


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


def insightface_margins(margin_list, rule="insightface"):
    """(m1, m2, m3) of the loss insightface's CombinedMarginLoss(s, *margin_list) computes.

    rule="insightface": its branches. m1 == 1 and m3 == 0 is ArcFace with m2; m3 > 0 is CosFace
    with m3 alone (m1 and m2 are ignored: warned here); anything else makes it raise, and a
    ValueError here. rule="combined": the true combined margin cos(m1 * theta + m2) - m3.
    """
    if rule not in MARGIN_RULES:
        raise ValueError(f"margins must be one of {MARGIN_RULES}, got {rule!r}")
    m1, m2, m3 = (float(m) for m in margin_list)
    if rule == "combined" or (m1 == 1.0 and m3 == 0.0):
        return m1, m2, m3
    if m3 > 0.0:
        if m1 != 1.0 or m2 != 0.0:
            warnings.warn(f"insightface's CombinedMarginLoss ignores m1={m1} and m2={m2} when m3 > 0: "
                          f"reproducing that (CosFace, m3={m3}); pass margins='combined' for "
                          f"cos(m1 * theta + m2) - m3", UserWarning, stacklevel=3)
        return 1.0, 0.0, m3
    raise ValueError(f"insightface's CombinedMarginLoss raises for margin_list={tuple(margin_list)} (it takes "
                     f"m1 == 1 with m3 == 0, or m3 > 0); pass margins='combined' for cos(m1 * theta + m2) - m3")


def from_insightface(shards, *, scale=64.0, margin_list=(1.0, 0.5, 0.0), margins="insightface",
                     margin_grad="straight_through", sub_centers=1, sharded=False, process_group=None,
                     **head_options):
    """A head holding the classes of insightface PartialFC_V2 shards (paths or state_dicts, rank
    order) that computes what arcface_torch computes with that config.

    scale and margin_list are insightface's config (the defaults are its ArcFace). By default the
    margins follow its CombinedMarginLoss (`insightface_margins`: m3 > 0 drops m1 and m2, with a
    warning; margins="combined" for the true combined margin) and the gradient is its
    straight-through one (dphi/dc = 1; margin_grad="exact" for the true derivative).
    sharded=False: a single-device CombinedMarginLoss with every class. sharded=True: a
    ShardedMarginLoss over process_group (any world size: the classes are re-split for it),
    holding this rank's shard; its loss is this rank's share (`global_loss` gives insightface's
    global value). sub_centers: rows per class in the shards (insightface's own have 1). Other
    keywords go to the head (sample_rate, backend, ..., and insightface's
    interclass_filtering_threshold: > 0 filters the non-target cosines above it, as its loss).
    Not reproduced (README, "Coming from PML / insightface"): its loss floor and its target
    logit past theta > pi - m2.
    """
    full = gather_shards(shards, sub_centers=sub_centers)
    m1, m2, m3 = insightface_margins(margin_list, margins)
    num_classes = full.shape[0] // sub_centers
    settings = dict(scale=scale, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad, sub_centers=sub_centers,
                    device=full.device, dtype=full.dtype, **head_options)
    if sharded:
        head = ShardedMarginLoss(num_classes, full.shape[1], process_group=process_group, **settings)
        local = full[head.class_start * sub_centers : head.class_stop * sub_centers]
    else:
        head = CombinedMarginLoss(num_classes, full.shape[1], **settings)
        local = full
    with torch.no_grad():
        head.weight.copy_(local)
    return head


def global_loss(loss, process_group=None):
    """The global batch loss on every rank, from a sharded head's per-rank share, as insightface's
    PartialFC_V2 returns it; its gradient is the share's, so `global_loss(head(x, y)).backward()`
    on every rank trains exactly as `head(x, y).backward()` does. (An all-reduce of the detached
    value: no extra backward communication.)"""
    total = loss.detach().clone()
    dist.all_reduce(total, group=process_group)
    return loss + (total - loss.detach())
