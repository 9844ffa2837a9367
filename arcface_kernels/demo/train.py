"""A small CNN embedder and the loop that trains it with one margin head."""

from dataclasses import dataclass

import torch
from torch import nn

from ..heads import CombinedMarginLoss


@dataclass(frozen=True)
class HeadSpec:
    name: str
    m1: float
    m2: float
    m3: float


# The four heads of the demo (docs/design.md section 3: phi(c) = cos(m1*theta + m2) - m3).
HEADS = (
    HeadSpec("softmax", 1.0, 0.0, 0.0),     # normalized softmax, no margin
    HeadSpec("ArcFace", 1.0, 0.5, 0.0),
    HeadSpec("CosFace", 1.0, 0.0, 0.35),
    HeadSpec("SphereFace", 1.35, 0.0, 0.0),
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
    head = CombinedMarginLoss(len(splits.seen_digits), dim, scale=scale, m1=spec.m1, m2=spec.m2,
                              m3=spec.m3, backend=backend).to(device)
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
