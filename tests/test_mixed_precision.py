"""Mixed precision as users train: a backbone under torch.autocast feeds low-precision embeddings
to a head whose weight is a float32 master parameter (insightface's arcface_torch recipe)."""

import pytest
import torch
from float64_oracle import oracle

import arcface_kernels as ak
from helpers import TOL, make_problem, rel_err

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_low_precision_embeddings_and_a_float32_master_weight(dtype, backend):
    x, w, y = make_problem(6, 11, 8, seed=2)
    x = x.to(dtype).requires_grad_(True)     # what an autocast backbone hands over
    w = w.requires_grad_(True)               # the float32 master weight
    with torch.autocast("cpu", dtype=dtype):
        loss = ak.margin_softmax_loss(x, w, y, scale=16.0, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    # Autocast rounds the weight to `dtype` for the op: the float64 formula on those values.
    want = oracle(x.detach(), w.detach().to(dtype), y, scale=16.0)
    for got, ref in zip((loss.detach(), x.grad, w.grad), want):
        assert rel_err(got, ref) <= TOL[dtype]


def test_float64_is_never_downcast_by_autocast():
    x, w, y = make_problem(5, 9, 6, dtype=torch.float64, seed=3)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ak.margin_softmax_loss(x, w, y, m2=0.3, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float64 and w.grad.dtype == torch.float64
    want = oracle(x, w.detach(), y, m2=0.3)
    assert rel_err(loss.detach(), want[0]) < 1e-13 and rel_err(w.grad, want[2]) < 1e-12


def test_mismatched_dtypes_outside_autocast_are_refused():
    x, w, y = make_problem(4, 6, 5)
    with pytest.raises(TypeError, match=r"embeddings \(torch.bfloat16\) and weight \(torch.float32\) must"):
        ak.margin_softmax_loss(x.bfloat16(), w, y, backend="torch")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_training_loop_under_autocast(dtype):
    # backbone + head + optimizer step, as arcface_torch trains; float16 with a GradScaler.
    torch.manual_seed(0)
    n_classes, dim = 10, 16
    centres = torch.randn(n_classes, 32)
    backbone = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, dim))
    head = ak.ArcFaceLoss(n_classes, dim, scale=16.0, margin=0.2, backend="torch")
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    losses = []
    for _ in range(30):
        labels = torch.randint(0, n_classes, (32,))
        images = centres[labels] + 0.3 * torch.randn(32, 32)
        with torch.autocast("cpu", dtype=dtype):
            embeddings = backbone(images)
            assert embeddings.dtype == dtype
            loss = head(embeddings, labels)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        assert head.weight.grad.dtype == torch.float32
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
