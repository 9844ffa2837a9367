"""Partial FC on one device (sample_rate on the single-device heads): no process group, the loss
over the sampled classes, zero gradient elsewhere, positives kept, resumable sampling."""

import io
import math

import pytest
import torch
import torch.distributed as dist

import arcface_kernels as ak
from helpers import rel_err

C, D, K = 23, 6, 2


def _head(sample_rate=0.3, seed=7, **kwargs):
    head = ak.CombinedMarginLoss(C, D, scale=16.0, m2=0.3, sub_centers=K, sample_rate=sample_rate, seed=seed,
                                 dtype=torch.float64, backend="torch", **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C * K, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return head


def _batch(step, n=4):
    g = torch.Generator().manual_seed(100 + step)
    y = torch.randint(0, C, (n,), generator=g)
    y[2] = -100
    return torch.randn(n, D, generator=g, dtype=torch.float64), y


def test_sampled_loss_is_the_loss_over_the_sampled_classes():
    assert not dist.is_initialized()
    head = _head()
    x, y = _batch(0)
    x.requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    classes = head.sampled_classes
    positives = torch.unique(y[y >= 0])
    assert torch.all(torch.isin(positives, classes)), "every positive class is kept"
    assert len(classes) == max(math.ceil(0.3 * C), len(positives))
    assert torch.equal(classes, torch.sort(classes).values) and len(torch.unique(classes)) == len(classes)
    # independent check: the float64 reference over exactly those classes, labels renumbered
    rows = (classes[:, None] * K + torch.arange(K)).flatten()
    w = head.weight.detach()[rows].clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    renumbered = torch.where(y >= 0, torch.searchsorted(classes, y.clamp_min(0)), -100)
    ref = ak.margin_softmax_loss(x_ref, w, renumbered, scale=16.0, m2=0.3, sub_centers=K, backend="reference")
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-12
    assert rel_err(x.grad, x_ref.grad) < 1e-10
    assert rel_err(head.weight.grad[rows], w.grad) < 1e-10
    unsampled = torch.ones(C * K, dtype=torch.bool)
    unsampled[rows] = False
    assert unsampled.any() and torch.all(head.weight.grad[unsampled] == 0)


def test_stats_name_global_classes_and_eval_uses_every_class():
    head = _head()
    x, y = _batch(1)
    _, stats = head(x, y, return_stats=True)
    sampled_cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    sampled_cos = sampled_cos.view(len(x), C, K).amax(dim=2)[:, head.sampled_classes]
    assert torch.equal(stats.top1, head.sampled_classes[sampled_cos.argmax(dim=1)])
    head.eval()
    full = ak.margin_softmax_loss(x, head.weight, y, scale=16.0, m2=0.3, sub_centers=K, backend="reference")
    torch.testing.assert_close(head(x, y), full, rtol=1e-12, atol=0)


def test_sampler_state_resumes_the_same_draws():
    uninterrupted = _head()
    for step in range(3):
        uninterrupted(*_batch(step))
    expected = uninterrupted.sampled_classes.clone()

    first = _head()
    for step in range(2):
        first(*_batch(step))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    assert "sampler._extra_state" in first.state_dict()
    buffer.seek(0)
    resumed = _head(seed=12345)                  # another seed: only the loaded state can match
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed(*_batch(2))
    assert torch.equal(resumed.sampled_classes, expected)

    restarted = _head()                          # not resumed: draws the first step's classes again
    restarted(*_batch(2))
    assert not torch.equal(restarted.sampled_classes, expected)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_sample_rate_range(rate):
    with pytest.raises(ValueError, match="sample_rate must lie in"):
        ak.ArcFaceLoss(C, D, sample_rate=rate)


def test_full_rate_has_no_sampler():
    head = ak.ArcFaceLoss(C, D, sample_rate=1.0)
    assert head.sampler is None and list(head.state_dict()) == ["weight"]
