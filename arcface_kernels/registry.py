"""The backend interface and the one dispatch point every backend plugs into.

A fused backend computes, for raw embeddings x (N, D) and raw class rows w (C*K, D),
per-row *partial* statistics over the classes it is given (DESIGN.md section 3), and
the gradients given the final log-sum-exp. The op (`op.py`) turns the partials into
the loss; the distributed module merges partials from several class shards with the
same functions. Backends never see ignore_index: a row whose target is not among the
given classes (ignored, or owned by another shard) has label -1.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


@dataclass(frozen=True)
class MarginConfig:
    """Scalar settings of one call, shared by every backend."""

    scale: float
    sub_centers: int
    easy_margin: bool
    straight_through: bool  # margin_grad == "straight_through": dphi/dc := 1
    label_smoothing: float
    num_classes: int  # C of the whole problem (all shards): label smoothing spreads eps over it


class PartialStats(NamedTuple):
    """Per-row statistics of z = s * cos (target margined) over a set of classes, in float32
    (float64 for float64 inputs, which only the `torch` backend takes).

    row_max:     max_j z_ij
    sum_exp:     sum_j exp(z_ij - row_max)
    target_logit: s * phi(cos_iy) where label_i >= 0, else 0
    logit_sum:   sum_j z_ij (label smoothing needs it)
    target_cos:  cos_iy where label_i >= 0, else 0
    best_cos:    max_j cos_ij (plain cosine, no margin)
    best_class:  int64 argmax_j cos_ij, the lowest index on ties
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    target_cos: torch.Tensor
    best_cos: torch.Tensor
    best_class: torch.Tensor


# forward(x, w, labels, m1, m2, m3, cfg) -> PartialStats
#   labels: int64 (N,), -1 where the row has no target among these classes.
#   m1, m2, m3: float32 (N,) per-row margins.
ForwardFn = Callable[..., PartialStats]
# backward(grad_rows, x, w, labels, m1, m2, m3, lse, cfg) -> (dx (N, D) float32, dw (C*K, D) in w.dtype)
#   grad_rows: float32 (N,), 0 on ignored rows. lse: float32 (N,), the final log-sum-exp.
#   dx is this call's contribution only (shards sum theirs), kept in float32 (float64 for float64).
BackwardFn = Callable[..., tuple]
# available(device) -> (ok, reason when not ok)
AvailableFn = Callable[[torch.device], tuple]


@dataclass(frozen=True)
class Backend:
    name: str
    forward: ForwardFn
    backward: BackwardFn
    available: AvailableFn
    # "auto" picks the available backend with the highest priority for the device type.
    priority: Callable[[torch.device], int]


# Input dtypes the compiled (triton, cuda) kernels take; they hand float64 to the torch backend's code.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_BACKENDS: dict = {}
# Backends whose import failed, with the reason, so that errors can say why.
_UNREGISTERED: dict = {}

FUSED_BACKEND_NAMES = ("cuda", "triton", "torch")
ALL_BACKEND_NAMES = ("auto", "reference") + FUSED_BACKEND_NAMES


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _UNREGISTERED.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    if name not in _BACKENDS:
        _UNREGISTERED[name] = reason


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]


def backend_status(name: str, device: torch.device) -> tuple:
    """(available, reason) of a fused backend on a device."""
    if name in _BACKENDS:
        return _BACKENDS[name].available(device)
    return False, _UNREGISTERED.get(name, "not registered")


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for a requested name on a device; ValueError/RuntimeError if none."""
    if name not in ALL_BACKEND_NAMES:
        raise ValueError(f"backend must be one of {ALL_BACKEND_NAMES}, got {name!r}")
    if name == "reference":
        return name
    if name != "auto":
        ok, reason = backend_status(name, device)
        if not ok:
            raise RuntimeError(f"backend={name!r} is not available on {device}: {reason}")
        return name
    candidates = [b for b in _BACKENDS.values() if b.available(device)[0]]
    if not candidates:
        return "reference"
    return max(candidates, key=lambda b: b.priority(device)).name
