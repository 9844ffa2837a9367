"""The digits data set (bundled with scikit-learn), split into seen classes and unseen ones."""

from dataclasses import dataclass

import torch


@dataclass
class DigitSplits:
    train_x: torch.Tensor   # (n, 1, 8, 8) float32 in [0, 1], seen classes only
    train_y: torch.Tensor   # labels remapped to 0 .. len(seen) - 1
    test_x: torch.Tensor    # held-out images of the seen classes
    test_y: torch.Tensor
    unseen_x: torch.Tensor  # every image of the classes held out of training
    unseen_y: torch.Tensor  # their original digit labels
    seen_digits: list


def load_digit_splits(unseen_digits=(8, 9), test_fraction=0.25, seed=0) -> DigitSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    unseen = torch.isin(labels, torch.tensor(list(unseen_digits), dtype=torch.int64))
    seen_digits = sorted(set(range(10)) - set(unseen_digits))
    if len(seen_digits) < 2 or not unseen_digits:
        raise ValueError("hold out at least one digit and keep at least two for training")
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[seen_digits] = torch.arange(len(seen_digits))
    seen_idx = torch.nonzero(~unseen).flatten()
    g = torch.Generator().manual_seed(seed)
    # Stratified split: the same test fraction of every seen digit.
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in seen_digits:
        idx = seen_idx[labels[seen_idx] == digit]
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: int(round(test_fraction * len(idx)))]] = True
    train_mask = ~unseen & ~test_mask
    return DigitSplits(
        train_x=images[train_mask], train_y=remap[labels[train_mask]],
        test_x=images[test_mask], test_y=remap[labels[test_mask]],
        unseen_x=images[unseen], unseen_y=labels[unseen], seen_digits=seen_digits,
    )
