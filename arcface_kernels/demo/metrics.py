"""Verification metrics from similarity scores: ROC AUC and TAR at a fixed FAR."""

import torch


def pair_scores(embeddings, labels):
    """Cosine similarity and same-class flag of every unordered pair (i < j)."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    return (unit[i] * unit[j]).sum(1), labels[i] == labels[j]


def roc_auc(scores, genuine):
    """Probability that a genuine pair scores above an impostor pair (ties count half):
    the Mann-Whitney U statistic over the product of the class sizes."""
    scores = scores.double()
    n_pos, n_neg = int(genuine.sum()), int((~genuine).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both genuine and impostor pairs")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average ranks over runs of tied scores.
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    rank_sum = ranks[genuine].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tar_at_far(scores, genuine, far=1e-2):
    """True accept rate at the smallest threshold whose false accept rate is at most `far`
    (a pair is accepted when its score is strictly above the threshold)."""
    impostor = torch.sort(scores[~genuine].double(), descending=True).values
    if len(impostor) == 0 or not genuine.any():
        raise ValueError("TAR@FAR needs both genuine and impostor pairs")
    allowed = int(far * len(impostor))  # impostors that may score above the threshold
    threshold = impostor[allowed] if allowed < len(impostor) else impostor[-1] - 1.0
    return float((scores[genuine].double() > threshold).double().mean())
