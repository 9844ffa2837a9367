"""Under DistributedDataParallel on 2 gloo ranks, the backbone's gradient (and the head's) equals a
single-process run on the concatenated batch, for the recipes of docs/ddp.md: the plain head
inside the backbone's DDP or in its own, and the sharded head outside DDP."""

import copy

import torch
import torch.distributed as dist
from spawn import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import arcface_kernels as ak
from arcface_kernels.distributed import ShardedMarginLoss
from helpers import rel_err

C, D, IN, ROWS = 9, 6, 8, 5          # ROWS per rank


class Model(nn.Module):
    """Backbone and head in one module, so that one DDP wraps both."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, inputs, labels):
        return self.head(self.backbone(inputs), labels)


def _setup(world):
    torch.manual_seed(0)                                  # same on every rank
    backbone = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, D)).double()
    head = ak.ArcFaceLoss(C, D, scale=16.0, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        head.weight.normal_()
    inputs = torch.randn(ROWS * world, IN, dtype=torch.float64)
    labels = torch.randint(0, C, (ROWS * world,))
    return backbone, head, inputs, labels


def _single_process_grads(backbone, head, inputs, labels):
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    head(backbone(inputs), labels).backward()
    return [p.grad for p in backbone.parameters()], head.weight.grad


def _assert_grads(got, expected, what):
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-12, f"{what}: relative error {rel_err(g, e):.2e}"


def _ddp_ranks(rank, world):
    backbone, head, inputs, labels = _setup(world)
    ref_backbone, ref_head = _single_process_grads(backbone, head, inputs, labels)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)

    # 1. plain head inside the backbone's DDP
    model = DDP(Model(copy.deepcopy(backbone), copy.deepcopy(head)))
    model(inputs[mine], labels[mine]).backward()
    _assert_grads([p.grad for p in model.module.backbone.parameters()], ref_backbone, "inside: backbone")
    _assert_grads([model.module.head.weight.grad], [ref_head], "inside: head")

    # 2. plain head in its own DDP
    net, plain = DDP(copy.deepcopy(backbone)), DDP(copy.deepcopy(head))
    plain(net(inputs[mine]), labels[mine]).backward()
    _assert_grads([p.grad for p in net.parameters()], ref_backbone, "own DDP: backbone")
    _assert_grads([plain.module.weight.grad], [ref_head], "own DDP: head")

    # 3. sharded head outside DDP: ddp_backbone=True (the default) undoes DDP's average
    for ddp_backbone, expected_factor in ((True, 1.0), (False, 1.0 / world)):
        net = DDP(copy.deepcopy(backbone))
        sharded = ShardedMarginLoss(C, D, scale=16.0, ddp_backbone=ddp_backbone, backend="torch", dtype=torch.float64)
        with torch.no_grad():
            sharded.weight.copy_(head.weight[sharded.class_start : sharded.class_stop])
        loss = sharded(net(inputs[mine]), labels[mine])
        loss.backward()
        expected = [g * expected_factor for g in ref_backbone]
        _assert_grads([p.grad for p in net.parameters()], expected, f"sharded (ddp_backbone={ddp_backbone})")
        _assert_grads([sharded.weight.grad], [ref_head[sharded.class_start : sharded.class_stop]], "sharded: shard")
        total = loss.detach().clone()
        dist.all_reduce(total)                            # the ranks' shares add up to the batch loss
        with torch.no_grad():
            expected_loss = ak.margin_softmax_loss(backbone(inputs), head.weight, labels, scale=16.0,
                                                   backend="reference")
        torch.testing.assert_close(total, expected_loss, rtol=1e-12, atol=0)


def test_ddp_backbone_gradient_equals_single_process():
    run_ranks(_ddp_ranks, 2)
