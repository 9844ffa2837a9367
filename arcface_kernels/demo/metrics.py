"""Verification metrics from similarity scores: ROC AUC and TAR at a fixed FAR.

Thin wrappers over `sklearn.metrics` (roc_auc_score, roc_curve) that take the torch tensors the
demo produces: `scores` (one similarity per pair, higher means more alike) and `genuine` (bool,
True where the pair shares a class)."""

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve


def pair_scores(embeddings, labels):
    """Cosine similarity and same-class flag of every unordered pair (i < j)."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    return (unit[i] * unit[j]).sum(1), labels[i] == labels[j]


def _as_numpy(scores, genuine, metric):
    scores = scores.detach().double().cpu().numpy()
    genuine = genuine.detach().cpu().numpy().astype(bool)
    if genuine.all() or not genuine.any():
        raise ValueError(f"{metric} needs both genuine and impostor pairs")
    return scores, genuine


def roc_auc(scores, genuine):
    """Area under the ROC curve: the probability that a genuine pair scores above an impostor
    pair, ties counting half (`sklearn.metrics.roc_auc_score`)."""
    return float(roc_auc_score(*_as_numpy(scores, genuine, "ROC AUC")[::-1]))


def tar_at_far(scores, genuine, far=1e-2):
    """True accept rate at a false accept rate of at most `far`.

    Convention: the largest TAR among the points of `sklearn.metrics.roc_curve` whose FAR is
    <= `far`. A pair is accepted when its score is >= the point's threshold, and the curve has a
    point at every distinct score, so this is the lowest threshold that accepts at most
    floor(far x impostors) impostor pairs. A genuine pair tied with the first impostor that
    threshold must reject is rejected with it; when nothing can be accepted (the curve's first
    point, threshold +inf) the TAR is 0."""
    scores, genuine = _as_numpy(scores, genuine, "TAR@FAR")
    fpr, tpr, _ = roc_curve(genuine, scores, drop_intermediate=False)
    return float(np.max(tpr[fpr <= far]))
