"""Helpers every backend shares: the workspace budget, chunk sizing and the inverse norms."""

import contextlib
import contextvars

import torch

from ..dtypes import compute_dtype
from ..margins import NORM_EPS
from .contract import RowNorms

DEFAULT_WORKSPACE_BUDGET = 64 * 2**20
# Per thread and per asyncio task: a budget set in one never leaks into another.
_workspace_budget = contextvars.ContextVar("arcface_kernels_workspace_budget", default=DEFAULT_WORKSPACE_BUDGET)


def get_workspace_budget() -> int:
    """The current bound, in bytes, on a backend's per-chunk workspace."""
    return _workspace_budget.get()


@contextlib.contextmanager
def workspace_budget(nbytes: int):
    """Bound every chunking backend's per-chunk workspace to `nbytes` inside the block."""
    if isinstance(nbytes, bool) or int(nbytes) != nbytes or int(nbytes) <= 0:
        raise ValueError(f"workspace budget must be a positive number of bytes, got {nbytes!r}")
    token = _workspace_budget.set(int(nbytes))
    try:
        yield
    finally:
        _workspace_budget.reset(token)


def classes_per_chunk(bytes_per_class: int) -> int:
    """How many classes one chunk may hold when each costs `bytes_per_class` of workspace."""
    return max(1, get_workspace_budget() // max(1, bytes_per_class))


# Rows are upcast for their norms a slice at a time: a float32 copy of a bf16 weight with
# millions of rows would be larger than the whole workspace.
_NORM_SLICE_BYTES = 16 * 2**20


def inverse_norms(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(|v_i|, eps) per row, in `dtype`."""
    norms = torch.empty(v.shape[0], dtype=dtype, device=v.device)
    step = max(1, _NORM_SLICE_BYTES // (max(v.shape[1], 1) * 8))
    for start in range(0, v.shape[0], step):
        norms[start : start + step] = torch.linalg.vector_norm(v[start : start + step].to(dtype), dim=1)
    return 1.0 / norms.clamp_min(NORM_EPS)


def row_norms(x: torch.Tensor, w: torch.Tensor) -> RowNorms:
    """The inverse norms of embeddings and class rows, once per call (contract.RowNorms)."""
    dtype = compute_dtype(x.dtype)
    return RowNorms(inverse_norms(x, dtype), inverse_norms(w, dtype))


def projection_scale(r: torch.Tensor) -> torch.Tensor:
    """r^2 where the row's norm exceeds eps, else 0: the weight of the normalization term of the
    gradient (docs/design.md section 5), which F.normalize drops for rows clamped at eps."""
    return torch.where(r < 1.0 / NORM_EPS, r * r, 0.0)
