"""Weights in and out of pytorch-metric-learning (checked against PML itself) and insightface's
PartialFC_V2 shards (files written in its layout)."""


import pytest
import torch
from spawn import run_ranks

import arcface_kernels as ak
from arcface_kernels import compat

N, C, D = 9, 7, 5


# -- insightface -------------------------------------------------------------------------------

def _insightface_split(num_classes, world):
    """PartialFC_V2's (class_start, num_local) per rank, written out from its constructor."""
    base, extra = num_classes // world, num_classes % world
    return [(base * r + min(r, extra), base + int(r < extra)) for r in range(world)]


def _write_insightface_files(directory, weight, world, checkpoint):
    paths = []
    for rank, (start, num_local) in enumerate(_insightface_split(weight.shape[0], world)):
        state = {"weight": weight[start : start + num_local].clone()}
        if checkpoint:   # train_v2.py's checkpoint_gpu_{rank}.pt
            path = directory / f"checkpoint_gpu_{rank}.pt"
            state = {"epoch": 3, "global_step": 30, "state_dict_softmax_fc": state}
        else:            # softmax_fc_gpu_{rank}.pt: module_partial_fc.state_dict()
            path = directory / f"softmax_fc_gpu_{rank}.pt"
        torch.save(state, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("checkpoint", [False, True])
def test_from_insightface_single_device(tmp_path, checkpoint):
    g = torch.Generator().manual_seed(4)
    full = torch.randn(11, D, generator=g, dtype=torch.float64)
    paths = _write_insightface_files(tmp_path, full, 3, checkpoint)
    head = compat.from_insightface(paths, margin_list=(1.0, 0.4, 0.0), scale=32.0, backend="torch")
    assert isinstance(head, ak.CombinedMarginLoss) and torch.equal(head.weight.data, full)
    x, y = torch.randn(6, D, generator=g, dtype=torch.float64), torch.randint(0, 11, (6,), generator=g)
    torch.testing.assert_close(head(x, y), ak.margin_softmax_loss(x, full, y, scale=32.0, m2=0.4,
                                                                  backend="reference"), rtol=1e-12, atol=0)


def test_gather_and_reshard():
    full = torch.randn(10 * 2, D)   # 10 classes, 2 sub-centres each
    for world in (1, 3, 4):
        shards = compat.reshard(full, world, sub_centers=2)
        sizes = [s["weight"].shape[0] // 2 for s in shards]
        assert sizes == [n for _, n in _insightface_split(10, world)]
        assert torch.equal(compat.gather_shards(shards, sub_centers=2), full)
    shards = compat.reshard(full[:11], 3)
    with pytest.raises(ValueError, match="rank-ordered split"):
        compat.gather_shards(shards[::-1])
    with pytest.raises(ValueError, match="no 'weight'"):
        compat.gather_shards([{"weight_activated": full}])


def _sharded_from_files(rank, world, paths, full):
    """Shards written by 3 insightface ranks, loaded on `world` ranks: each holds its split, the
    loss equals the single-process loss, and the saved state_dicts gather back to the same weight."""
    head = compat.from_insightface(paths, sharded=True, backend="torch", ddp_backbone=False)
    start, num_local = _insightface_split(full.shape[0], world)[rank]
    assert torch.equal(head.weight.data, full[start : start + num_local])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4 * world, D, generator=g, dtype=torch.float64), torch.randint(0, 11, (4 * world,), generator=g)
    loss = head(x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]).detach()
    torch.distributed.all_reduce(loss)
    torch.testing.assert_close(loss, ak.margin_softmax_loss(x, full, y, backend="reference"), rtol=1e-12, atol=0)
    states = [None] * world
    torch.distributed.all_gather_object(states, head.state_dict())
    assert torch.equal(compat.gather_shards(states), full)


@pytest.mark.parametrize("world", [2])
def test_from_insightface_sharded_other_world_size(tmp_path, world):
    full = torch.randn(11, D, dtype=torch.float64)
    paths = [str(p) for p in _write_insightface_files(tmp_path, full, 3, checkpoint=False)]
    run_ranks(_sharded_from_files, world, paths, full)
