"""A small CNN embedder and the loop that trains it with one margin head."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..heads import CombinedMarginLoss
from ..margin_heads import AdaFaceLoss, CurricularFaceLoss


@dataclass(frozen=True)
class HeadSpec:
    name: str
    make: Callable[..., CombinedMarginLoss]  # make(num_classes, dim, scale=, backend=)


def _combined(m1, m2, m3):
    """phi(c) = cos(m1*theta + m2) - m3 (docs/design.md section 3)."""
    return lambda num_classes, dim, **settings: CombinedMarginLoss(num_classes, dim, m1=m1, m2=m2, m3=m3, **settings)


# The heads of the demo: the four fixed margins, then two of the margin family at their authors'
# defaults (AdaFace: margin 0.4, h 0.333; CurricularFace: margin 0.5, t_alpha 0.01).
HEADS = (
    HeadSpec("softmax", _combined(1.0, 0.0, 0.0)),     # normalized softmax, no margin
    HeadSpec("ArcFace", _combined(1.0, 0.5, 0.0)),
    HeadSpec("CosFace", _combined(1.0, 0.0, 0.35)),
    HeadSpec("SphereFace", _combined(1.35, 0.0, 0.0)),
    HeadSpec("AdaFace", AdaFaceLoss),
    HeadSpec("CurricularFace", CurricularFaceLoss),
)


class DigitEmbedder(nn.Module):
    """8x8 digit -> `dim`-dimensional embedding."""

    def __init__(self, dim):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 64 x 4 x 4
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, dim),
        )

    def forward(self, images):
        return self.features(images)


@dataclass
class TrainedHead:
    spec: HeadSpec
    embedder: DigitEmbedder
    head: CombinedMarginLoss
    final_loss: float


def train_head(spec, splits, *, dim, scale, epochs, batch_size, lr, seed, device, backend, progress=None):
    """Train a fresh embedder and class centres with one head; `progress(epoch_loss)` per epoch."""
    torch.manual_seed(seed)
    embedder = DigitEmbedder(dim).to(device)
    head = spec.make(len(splits.seen_digits), dim, scale=scale, backend=backend).to(device)
    params = list(embedder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    total_steps = epochs * -(-len(splits.train_y) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1))
    x, y = splits.train_x.to(device), splits.train_y.to(device)
    g = torch.Generator().manual_seed(seed)
    epoch_loss = float("nan")
    for _ in range(epochs):
        embedder.train()
        order = torch.randperm(len(y), generator=g).to(device)
        losses = []
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss = head(embedder(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        epoch_loss = sum(losses) / len(losses)
        if progress is not None:
            progress(epoch_loss)
    embedder.eval()
    return TrainedHead(spec, embedder, head, epoch_loss)


@torch.no_grad()
def embed(embedder, images, device):
    return embedder(images.to(device)).float().cpu()
