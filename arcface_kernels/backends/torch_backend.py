"""Registers the `torch` backend: the class walk of chunked.py (forward, backward) and, on a CPU,
the forward with gradients of row_blocks.py (docs/backends/torch.md)."""

from ..dtypes import FLOAT_DTYPES
from . import chunked, row_blocks
from .contract import Backend
from .registry import register_backend

register_backend(
    Backend(
        name="torch",
        forward=chunked.forward,
        backward=chunked.backward,
        available=lambda device: (True, ""),
        dtypes=FLOAT_DTYPES,
        priority=lambda device, dtype: 10,
        forward_with_gradients=row_blocks.forward_with_gradients,
    )
)
