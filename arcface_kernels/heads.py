"""nn.Module heads that own the class centres, for drop-in use in a training loop."""


import torch
from torch import nn

from .api import loss_from_options
from .options import LossOptions
from .predict import topk_classes


class CombinedMarginLoss(nn.Module):
    """Margin-softmax loss with learnable class centres: phi(c) = cos(m1 * theta + m2) - m3.

    `loss = head(embeddings, labels)`; weight has shape (num_classes * sub_centers, embedding_size).
    Extra keyword arguments (easy_margin, margin_grad, label_smoothing, ignore_index,
    reduction) are the other LossOptions; `backend` picks the backend. Options are validated
    here, at construction; `head(embeddings, labels, **overrides)` may change some per call.
    """

    def __init__(self, num_classes, embedding_size, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0,
                 sub_centers=1, backend="auto", device=None, dtype=None, **loss_options):
        super().__init__()
        self.options = LossOptions(scale=scale, m1=m1, m2=m2, m3=m3, sub_centers=sub_centers, **loss_options)
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be positive, got {num_classes}, {embedding_size}")
        self.num_classes, self.embedding_size, self.sub_centers = num_classes, embedding_size, sub_centers
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embedding_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        # Direction is all that matters: a small normal like insightface's heads.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings, labels, *, return_stats=False, backend=None, **overrides):
        options = self.options.replace(**overrides) if overrides else self.options
        return loss_from_options(embeddings, self.weight, labels, options, return_stats=return_stats,
                                 backend=self.backend if backend is None else backend)

    def predict(self, embeddings, k=1):
        """Top-k classes and their cosines, (N, k) each, without building N x C."""
        return topk_classes(embeddings, self.weight, k=k, sub_centers=self.sub_centers)

    def extra_repr(self):
        o = self.options
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"sub_centers={self.sub_centers}, scale={o.scale}, m=({o.m1}, {o.m2}, {o.m3})")


class ArcFaceLoss(CombinedMarginLoss):
    """Additive angular margin: phi(c) = cos(theta + margin)."""

    def __init__(self, num_classes, embedding_size, scale=64.0, margin=0.5, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=margin, m3=0.0, **kwargs)


class CosFaceLoss(CombinedMarginLoss):
    """Additive cosine margin: phi(c) = c - margin."""

    def __init__(self, num_classes, embedding_size, scale=64.0, margin=0.35, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=0.0, m3=margin, **kwargs)


class SphereFaceLoss(CombinedMarginLoss):
    """Multiplicative angular margin (the ArcFace paper's variant): phi(c) = cos(margin * theta)."""

    def __init__(self, num_classes, embedding_size, scale=64.0, margin=1.35, **kwargs):
        super().__init__(num_classes, embedding_size, scale=scale, m1=margin, m2=0.0, m3=0.0, **kwargs)
