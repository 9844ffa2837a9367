"""nn.Module heads that own the class centres, for drop-in use in a training loop.

Every setting after (num_classes, embedding_size) is keyword-only, and every angle is in
radians (pytorch-metric-learning takes degrees: compat.from_pml converts).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .api import loss_from_options
from .backends import get_workspace_budget
from .dtypes import compute_dtype
from .options import make_options
from .partial_fc import ClassSampler, class_rows
from .predict import topk_classes
from .validation import _real, angle, boolean, check_rows, check_tensors, fraction, integer, positive_int, target_labels

OUTLIER_THRESHOLD = math.radians(75)  # pytorch-metric-learning's default, 75 degrees


def filtering_options(threshold, loss_options):
    """loss_options with insightface's interclass_filtering_threshold turned into the op's setting:
    > 0 is nontarget="filter" with nontarget_t=threshold, 0 (its default) no filtering."""
    threshold = _real("interclass_filtering_threshold", threshold)
    if threshold < 0:
        raise ValueError(f"interclass_filtering_threshold must be >= 0 (0: no filtering), got {threshold}")
    if threshold == 0:
        return loss_options
    if loss_options.get("nontarget", "none") != "none":
        raise ValueError(f"interclass_filtering_threshold={threshold} is nontarget='filter'; it cannot be combined "
                         f"with nontarget={loss_options['nontarget']!r}")
    return dict(loss_options, nontarget="filter", nontarget_t=threshold)


class CombinedMarginLoss(nn.Module):
    """Margin-softmax loss with learnable class centres: phi(c) = cos(m1 * theta + m2) - m3.

    `loss = head(embeddings, labels)`; weight has shape (num_classes * sub_centers, embedding_size),
    class c owning rows c*K .. c*K+K-1. Extra keyword arguments (easy_margin, margin_grad,
    label_smoothing, ignore_index, reduction) are the other LossOptions; `backend` picks the
    backend. Options are validated here, at construction; `head(embeddings, labels, **overrides)`
    may change some per call.

    interclass_filtering_threshold > 0 is insightface's inter-class filtering: non-target cosines
    above it count as 0 (nontarget="filter", no gradient through them; `filtering_options`).

    sample_rate < 1 is Partial FC on one device (partial_fc.py): in training mode each step uses
    the batch's target classes plus sampled others, and the other rows get a zero gradient;
    `sampled_classes` holds the last step's classes and the sampler's state is in state_dict.
    In eval mode the loss is over every class.
    """

    def __init__(self, num_classes, embedding_size, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0,
                 sub_centers=1, sample_rate=1.0, seed=0, interclass_filtering_threshold=0.0, backend="auto",
                 device=None, dtype=None, **loss_options):
        super().__init__()
        # Validated once, here: forward reuses them (and validates only per-call overrides).
        self.options = make_options(type(self).__name__, scale=scale, m1=m1, m2=m2, m3=m3, sub_centers=sub_centers,
                                    **filtering_options(interclass_filtering_threshold, loss_options))
        self.num_classes = positive_int("num_classes", num_classes)
        self.embedding_size = positive_int("embedding_size", embedding_size)
        self.sub_centers = self.options.sub_centers
        self.backend = backend
        self.sample_rate = fraction("sample_rate", sample_rate)
        self.sampler = ClassSampler(self.sample_rate, integer("seed", seed)) if self.sample_rate < 1 else None
        self.sampled_classes = None
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.sub_centers, self.embedding_size, device=device,
                                               dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        # Direction is all that matters: a small normal like insightface's heads.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings, labels, *, return_stats=False, backend=None, **overrides):
        options = self.options.replace(f"{type(self).__name__}.forward()", **overrides) if overrides else self.options
        backend = self.backend if backend is None else backend
        if self.sampler is None or not self.training:
            return loss_from_options(embeddings, self.weight, labels, options, return_stats=return_stats,
                                     backend=backend)
        labels = check_tensors(embeddings, self.weight, labels, self.sub_centers)  # the label rule, before sampling
        classes, sampled_labels = self._sample(labels, options.ignore_index)
        out = loss_from_options(embeddings, self.weight[class_rows(classes, self.sub_centers)], sampled_labels,
                                options, return_stats=return_stats, backend=backend)
        if return_stats:
            loss, stats = out
            return loss, stats._replace(top1=classes[stats.top1])
        return out

    def _sample(self, labels, ignore_index):
        """This step's classes (sorted) and the labels renumbered into them (ignored rows kept)."""
        targets = target_labels(labels, ignore_index, self.num_classes)
        is_positive = torch.zeros(self.num_classes, dtype=torch.bool, device=labels.device)
        is_positive[targets[targets >= 0]] = True
        classes = self.sampler(is_positive)
        self.sampled_classes = classes
        renumbered = torch.searchsorted(classes, targets.clamp_min(0))
        return classes, torch.where(targets >= 0, renumbered, ignore_index)

    def predict(self, embeddings, k=1):
        """Top-k classes and their cosines, (N, k) each, without building N x C (topk_classes)."""
        return topk_classes(embeddings, self.weight, k=k, sub_centers=self.sub_centers)

    @torch.no_grad()
    def get_logits(self, embeddings):
        """scale * cosine to every class, (N, C), without the margin (pytorch-metric-learning's
        get_logits). It materializes N x C: for small C only; predict() is the chunked top-k."""
        check_rows(embeddings, self.weight, self.sub_centers)
        x = F.normalize(embeddings.to(compute_dtype(embeddings.dtype)), dim=1)
        w = F.normalize(self.weight.to(x.dtype), dim=1)
        cos = (x @ w.T).view(x.shape[0], self.num_classes, self.sub_centers).amax(dim=2)
        return self.options.scale * cos

    def extra_repr(self):
        o = self.options
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"sub_centers={self.sub_centers}, scale={o.scale}, m=({o.m1}, {o.m2}, {o.m3}), "
                f"sample_rate={self.sample_rate}")


class ArcFaceLoss(CombinedMarginLoss):
    """Additive angular margin: phi(c) = cos(theta + margin), margin in radians."""

    def __init__(self, num_classes, embedding_size, *, scale=64.0, margin=0.5, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=margin, m3=0.0, **kwargs)


class CosFaceLoss(CombinedMarginLoss):
    """Additive cosine margin: phi(c) = c - margin."""

    def __init__(self, num_classes, embedding_size, *, scale=64.0, margin=0.35, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=0.0, m3=margin, **kwargs)


class SphereFaceLoss(CombinedMarginLoss):
    """Multiplicative angular margin (the ArcFace paper's variant): phi(c) = cos(margin * theta)."""

    def __init__(self, num_classes, embedding_size, *, scale=64.0, margin=1.35, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, m1=margin, m2=0.0, m3=0.0, **kwargs)


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: K centres per class, a class's cosine is the largest of its K.

    pytorch-metric-learning's name and defaults (scale 64, 3 sub-centres); the margin is in
    radians (0.5; PML's default 28.6 degrees is 0.4992 rad).
    """

    def __init__(self, num_classes, embedding_size, *, scale=64.0, margin=0.5, sub_centers=3, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, margin=margin, sub_centers=sub_centers, **kwargs)

    @torch.no_grad()
    def get_outliers(self, embeddings, labels, *, threshold=OUTLIER_THRESHOLD, return_dominant_centers=True):
        """Rows far from their class's dominant sub-centre, as pytorch-metric-learning defines them.

        A class's dominant sub-centre is the one nearest to most of its rows in this batch (ties:
        the lowest index). A row is an outlier when its angle to its class's dominant sub-centre
        exceeds `threshold` (radians in [0, pi]; PML's default 75 degrees; a threshold in degrees
        is refused with its conversion). Returns the outlier row indices
        (int64, ordered by label, then row, as PML) and, with return_dominant_centers, the
        (num_classes, D) dominant centres (PML returns their transpose; classes with no row in
        the batch get sub-centre 0). Rows labelled ignore_index are never outliers.
        Memory: O(N * K) cosines plus chunks of rows bounded by the workspace budget, never N x C.
        """
        k, d = self.sub_centers, self.embedding_size
        threshold = angle("threshold", threshold)
        return_dominant_centers = boolean("return_dominant_centers", return_dominant_centers)
        labels = check_tensors(embeddings, self.weight, labels, k)
        targets = target_labels(labels, self.options.ignore_index, self.num_classes)
        kept = torch.nonzero(targets >= 0).flatten()
        kept_targets = targets[kept]
        cdt = compute_dtype(embeddings.dtype)
        centres = self.weight.view(self.num_classes, k, d)
        cos = torch.empty(kept.shape[0], k, dtype=cdt, device=embeddings.device)
        step = max(1, get_workspace_budget() // (k * d * torch.finfo(cdt).bits // 8))
        for start in range(0, kept.shape[0], step):
            rows = slice(start, start + step)
            x = F.normalize(embeddings[kept[rows]].to(cdt), dim=1)
            w = F.normalize(centres[kept_targets[rows]].to(cdt), dim=2)
            cos[rows] = torch.einsum("nd,nkd->nk", x, w)
        votes = torch.zeros(self.num_classes * k, dtype=torch.int64, device=embeddings.device)
        votes.index_add_(0, kept_targets * k + cos.argmax(dim=1), torch.ones_like(kept_targets))
        dominant = votes.view(self.num_classes, k).argmax(dim=1)
        dominant_cos = cos.gather(1, dominant[kept_targets][:, None])[:, 0]
        is_outlier = dominant_cos < math.cos(threshold)
        outlier_rows, outlier_labels = kept[is_outlier], kept_targets[is_outlier]
        outliers = outlier_rows[torch.sort(outlier_labels, stable=True).indices]
        if not return_dominant_centers:
            return outliers
        return outliers, centres[torch.arange(self.num_classes, device=dominant.device), dominant]
