"""The demo runs end to end, and its verification metrics are right."""

import math

import pytest
import torch

from arcface_kernels.demo.__main__ import main
from arcface_kernels.demo.metrics import pair_scores, roc_auc, tar_at_far


def test_demo_quick_run_writes_table_and_figure(tmp_path):
    rows = main(["--quick", "--out", str(tmp_path), "--embedding-dim", "3"])
    assert [name for name, _ in rows] == ["softmax", "ArcFace", "CosFace", "SphereFace", "AdaFace", "CurricularFace"]
    for _, r in rows:
        for key in ("loss", "accuracy", "auc", "tar"):
            assert math.isfinite(r[key]), key
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    for name in ("embeddings.png", "embeddings_sphere.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_auc_counts_ties_as_half():
    # genuine 0.9, 0.5, 0.5 against impostors 0.5, 0.1: of the 6 (genuine, impostor) pairs, 4 are
    # ordered right and 2 are ties worth one half each: AUC = (4 + 2 / 2) / 6.
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    genuine = torch.tensor([True, True, True, False, False])
    assert roc_auc(scores, genuine) == pytest.approx(5 / 6, abs=1e-12)
    assert roc_auc(-scores, genuine) == pytest.approx(1 / 6, abs=1e-12)
    with pytest.raises(ValueError):
        roc_auc(scores, torch.ones(5, dtype=torch.bool))


def test_metrics_on_embeddings_with_known_answers():
    labels = torch.tensor([0] * 5 + [1] * 5)
    # Two tight, orthogonal clusters: every genuine pair scores 1, every impostor 0.
    separated = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(5, 1), torch.tensor([[0.0, 1.0]]).repeat(5, 1)])
    scores, genuine = pair_scores(separated, labels)
    assert int(genuine.sum()) == 20 and len(scores) == 45
    assert roc_auc(scores, genuine) == 1.0
    assert tar_at_far(scores, genuine, 1e-2) == 1.0
    # One direction for everything: no information, AUC one half, nothing accepted above ties.
    same = torch.ones(10, 2)
    scores, genuine = pair_scores(same, labels)
    assert roc_auc(scores, genuine) == pytest.approx(0.5)
    assert tar_at_far(scores, genuine, 1e-2) == 0.0


def test_tar_at_far_threshold():
    # impostors 0.00 .. 0.99: FAR 1e-2 allows one impostor (0.99) to be accepted, so the threshold
    # lies above 0.98: genuine 0.985 and 1.0 are accepted; 0.98 itself, tied with the second
    # impostor, is rejected with it.
    impostor = torch.arange(100, dtype=torch.float64) / 100
    genuine_scores = torch.tensor([0.985, float(impostor[98]), 1.0, 0.5], dtype=torch.float64)
    scores = torch.cat([impostor, genuine_scores])
    genuine = torch.cat([torch.zeros(100, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    assert tar_at_far(scores, genuine, 1e-2) == 0.5
    # FAR 2e-2 allows 0.98 and 0.99: the tied genuine 0.98 is accepted too.
    assert tar_at_far(scores, genuine, 2e-2) == 0.75
    # FAR below one impostor in a hundred: nothing above 0.99 but the genuine 1.0.
    assert tar_at_far(scores, genuine, 1e-3) == 0.25
    with pytest.raises(ValueError):
        tar_at_far(impostor, torch.zeros(100, dtype=torch.bool))
