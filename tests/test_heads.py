"""The nn.Module heads and chunked top-k prediction."""

import pytest
import torch

import arcface_kernels as ak
from helpers import make_problem


@pytest.mark.parametrize(
    "head_cls,expected",
    [(ak.ArcFaceLoss, (1.0, 0.5, 0.0)), (ak.CosFaceLoss, (1.0, 0.0, 0.35)), (ak.SphereFaceLoss, (1.35, 0.0, 0.0))],
)
def test_named_heads_use_their_margins(head_cls, expected):
    torch.manual_seed(0)
    head = head_cls(13, 6, sub_centers=2, backend="torch")
    assert head.weight.shape == (26, 6)
    x = torch.randn(5, 6)
    y = torch.randint(0, 13, (5,))
    m1, m2, m3 = expected
    direct = ak.margin_softmax_loss(x, head.weight, y, m1=m1, m2=m2, m3=m3, sub_centers=2, backend="torch")
    torch.testing.assert_close(head(x, y), direct)


def test_functional_named_forms():
    x, w, y = make_problem(5, 8, 4)
    torch.testing.assert_close(ak.arcface_loss(x, w, y, margin=0.3),
                               ak.margin_softmax_loss(x, w, y, m2=0.3))
    torch.testing.assert_close(ak.cosface_loss(x, w, y), ak.margin_softmax_loss(x, w, y, m2=0.0, m3=0.35))
    torch.testing.assert_close(ak.sphereface_loss(x, w, y), ak.margin_softmax_loss(x, w, y, m1=1.35, m2=0.0))


def test_head_trains():
    torch.manual_seed(1)
    head = ak.CombinedMarginLoss(10, 8, scale=16.0, m2=0.2)
    x = torch.randn(40, 8)
    y = torch.arange(40) % 10
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head(x, y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = head(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("k_sub", [1, 3])
def test_predict_topk_matches_full_cosines(k_sub):
    x, w, _ = make_problem(9, 300, 7, k=k_sub, seed=2)
    head = ak.CombinedMarginLoss(300, 7, sub_centers=k_sub)
    with torch.no_grad():
        head.weight.copy_(w)
    with ak.workspace_budget(4096):
        classes, cosines = head.predict(x, k=5)
    full = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    full = full.view(9, 300, k_sub).max(dim=2).values
    ref_cos, ref_cls = full.topk(5, dim=1)
    assert torch.equal(classes, ref_cls)
    torch.testing.assert_close(cosines, ref_cos)


def test_predict_rejects_bad_k():
    head = ak.ArcFaceLoss(4, 3)
    with pytest.raises(ValueError, match="k must lie in"):
        head.predict(torch.randn(2, 3), k=5)
