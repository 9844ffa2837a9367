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


@pytest.mark.parametrize("head_cls", [ak.ArcFaceLoss, ak.CosFaceLoss, ak.SphereFaceLoss, ak.SubCenterArcFaceLoss,
                                      ak.CombinedMarginLoss])
def test_settings_are_keyword_only(head_cls):
    # PML's ArcFaceLoss(num_classes, embedding_size, 28.6) must not silently become scale=28.6
    with pytest.raises(TypeError, match="positional"):
        head_cls(10, 4, 28.6)


def _pml_subcenter(num_classes, dim, k, seed):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(seed)
    pml = losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, sub_centers=k)
    pml.W.data = pml.W.data.double()
    head = ak.SubCenterArcFaceLoss(num_classes, dim, sub_centers=k, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(pml.W.T)
    return pml, head


def test_get_outliers_matches_pml():
    num_classes, dim, k, n = 6, 5, 3, 40
    pml, head = _pml_subcenter(num_classes, dim, k, seed=3)
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, num_classes - 1, (n,), generator=g)      # the last class has no row
    # rows near a random sub-centre of their class, some pushed far away: both kinds occur
    centres = head.weight.detach()[y * k + torch.randint(0, k, (n,), generator=g)]
    x = centres + torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.linspace(0.001, 0.05, n)[:, None]
    ref_outliers, ref_dominant = pml.get_outliers(x, y)
    assert 0 < len(ref_outliers) < n
    with ak.workspace_budget(2 * k * dim * 8):                     # two rows per chunk
        outliers, dominant = head.get_outliers(x, y)
    assert torch.equal(outliers, ref_outliers)
    present = torch.unique(y)
    torch.testing.assert_close(dominant[present], ref_dominant.T[present], rtol=0, atol=0)
    torch.testing.assert_close(dominant[num_classes - 1], head.weight.detach()[(num_classes - 1) * k])
    # an ignored row is never an outlier
    y_ignored = y.clone()
    y_ignored[ref_outliers[0]] = -100
    assert ref_outliers[0] not in head.get_outliers(x, y_ignored, return_dominant_centers=False).tolist()


def test_get_logits_matches_pml():
    pml, head = _pml_subcenter(7, 4, 2, seed=4)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(head.get_logits(x), pml.get_logits(x), rtol=1e-12, atol=0)
