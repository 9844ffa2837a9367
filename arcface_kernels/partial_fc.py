"""Partial FC's class sampling, shared by the single-device heads and the sharded head.

Every training step keeps the classes that are targets of some row of the batch (the
positives) and random other classes (negatives) until ceil(sample_rate * classes) are kept,
as insightface's PartialFC v2 does (it rounds down; we round up so that a tiny shard keeps at
least one class). The loss is then the margin softmax over the kept classes only, with labels
renumbered into them; the weight stays one Parameter and the kept rows are indexed out of it,
so the rows of the other classes get an exact zero gradient.

The random draw comes from the sampler's own CPU torch.Generator, whose state is part of the
module's state_dict: a run resumed from a checkpoint samples what the uninterrupted run would.
"""

import math

import torch
from torch import nn

from .validation import fraction


class ClassSampler(nn.Module):
    """Draws the classes of one Partial FC step. Its generator state is saved in state_dict
    (key `<name>._extra_state`)."""

    def __init__(self, sample_rate, seed):
        super().__init__()
        self.sample_rate = fraction("sample_rate", sample_rate)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, is_positive):
        """Sorted int64 indices of the kept classes, given a bool mask over the classes that marks
        the positives (on any device; the result is on the same device)."""
        num_classes = is_positive.shape[0]
        keep = max(math.ceil(self.sample_rate * num_classes), int(is_positive.sum()))
        # Random keys in [0, 1), positives pushed to 2: the top `keep` keys are every positive and
        # uniformly drawn negatives. Drawn on the CPU so the stream does not depend on the device.
        keys = torch.rand(num_classes, generator=self.generator).to(is_positive.device)
        keys = torch.where(is_positive, 2.0, keys)
        return torch.sort(torch.topk(keys, keep, sorted=False).indices).values

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])

    def extra_repr(self):
        return f"sample_rate={self.sample_rate}"


def class_rows(classes, sub_centers):
    """Weight rows of the given classes: class c owns rows c*K .. c*K+K-1."""
    offsets = torch.arange(sub_centers, device=classes.device)
    return (classes[:, None] * sub_centers + offsets).flatten()
