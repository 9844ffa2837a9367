"""The label rule a GPU checks with a device-side assert (validation.labels_in_range, no host
read) is the rule the CPU raises on (validation.invalid_labels)."""

import pytest
import torch

from arcface_kernels.validation import invalid_labels, labels_in_range


@pytest.mark.parametrize("num_classes, ignore_index", [(5, -100), (5, -1), (5, 3), (7, 7), (1, 0)])
def test_device_label_check_is_the_cpu_rule(num_classes, ignore_index):
    cases = [[0, num_classes - 1, ignore_index], [num_classes], [-1], [-2], [ignore_index, -100, num_classes + 1],
             list(range(num_classes)), [2**62], [-(2**62)], []]
    for labels in cases:
        labels = torch.tensor(labels, dtype=torch.int64)
        ok = labels_in_range(labels, labels == ignore_index, num_classes)
        assert bool(ok) == (not bool(invalid_labels(labels, ignore_index, num_classes).any())), labels
