"""A real training loop: backbone + head (Partial FC sampling) + SGD with momentum and weight
decay + CPU bf16 autocast + checkpoint save / load + resume. A run interrupted after a few steps
and resumed from its checkpoint (into freshly built objects with another initialization) ends
with bit-for-bit the weights of the uninterrupted run: single process, and 2 gloo ranks with a
DDP backbone and the sharded head."""

import torch
from spawn import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import arcface_kernels as ak
from arcface_kernels.distributed import ShardedMarginLoss

C, D, IN, ROWS, STEPS, INTERRUPT = 17, 8, 12, 6, 6, 3


def _build(init_seed, world):
    torch.manual_seed(init_seed)
    backbone = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, D))
    if world:
        head = ShardedMarginLoss(C, D, scale=16.0, m2=0.3, sample_rate=0.5, seed=init_seed, backend="torch")
        backbone = DDP(backbone)
    else:
        head = ak.ArcFaceLoss(C, D, scale=16.0, margin=0.3, sample_rate=0.5, seed=init_seed, backend="torch")
    params = [{"params": backbone.parameters()}, {"params": head.parameters()}]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return backbone, head, optimizer


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(ROWS, IN, generator=g), torch.randint(0, C, (ROWS,), generator=g)


def _train(backbone, head, optimizer, steps, rank):
    for step in steps:
        inputs, labels = _batch(step, rank)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = backbone(inputs)
            assert embeddings.dtype == torch.bfloat16
            loss = head(embeddings, labels)
        loss.backward()
        optimizer.step()


def _state(backbone, head, optimizer):
    return {"backbone": backbone.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict()}


def _check_resume(rank, world, directory):
    """world == 0: a single process without a process group."""
    uninterrupted = _build(0, world)
    initial = [p.detach().clone() for p in uninterrupted[0].parameters()]
    _train(*uninterrupted, range(STEPS), rank)

    first = _build(0, world)
    _train(*first, range(INTERRUPT), rank)
    path = f"{directory}/checkpoint_{rank}.pt"
    torch.save({"step": INTERRUPT, **_state(*first)}, path)
    del first

    resumed = _build(1, world)               # another init and sampler seed: only the checkpoint can match
    checkpoint = torch.load(path, weights_only=True)
    for obj, key in zip(resumed, ("backbone", "head", "optimizer")):
        obj.load_state_dict(checkpoint[key])
    _train(*resumed, range(checkpoint["step"], STEPS), rank)

    for module_a, module_b in zip(uninterrupted[:2], resumed[:2]):
        for (name, a), b in zip(module_a.named_parameters(), module_b.parameters()):
            assert torch.equal(a, b), f"rank {rank}: {name} differs after resuming"
    assert not any(torch.equal(a, p) for a, p in zip(initial, uninterrupted[0].parameters())), "training moves"


def test_resumed_training_equals_uninterrupted_single_process(tmp_path):
    _check_resume(0, 0, tmp_path)


def test_resumed_training_equals_uninterrupted_two_ranks(tmp_path):
    run_ranks(_check_resume, 2, str(tmp_path))
