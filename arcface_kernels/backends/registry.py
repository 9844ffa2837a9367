"""The backend registry: the one dispatch point every backend plugs into, and how a requested
name ("auto" included) becomes a concrete backend for an input."""

import importlib
from typing import NamedTuple

import torch

from .contract import Backend

_BACKENDS: dict = {}
# Backends whose import failed, with the reason, so that errors can say why.
_UNREGISTERED: dict = {}

FUSED_BACKEND_NAMES = ("cuda", "triton", "torch")
ALL_BACKEND_NAMES = ("auto", "reference") + FUSED_BACKEND_NAMES
# backend name -> module that registers it on import; the optional ones may fail to load.
_MODULES = {"torch": ".torch_backend", "triton": ".triton", "cuda": ".cuda"}


class Resolution(NamedTuple):
    name: str
    reason: str  # why this backend (for "auto": why the better-ranked ones were passed over)


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _UNREGISTERED.pop(backend.name, None)


def load_backends() -> None:
    """Import every backend module; a missing or broken optional backend is recorded, not raised."""
    for name, module in _MODULES.items():
        try:
            importlib.import_module(module, __package__)
        except Exception as err:  # a broken optional backend must not break the package
            if name == "torch":
                raise
            what = "not installed" if isinstance(err, ModuleNotFoundError) else "failed to load"
            _UNREGISTERED.setdefault(name, f"{what}: {type(err).__name__}: {err}")


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]


def backend_status(name: str, device: torch.device, dtype: torch.dtype = None) -> tuple:
    """(available, reason) of a fused backend on a device (and for an input dtype, if given)."""
    if name not in _BACKENDS:
        return False, _UNREGISTERED.get(name, "not registered")
    backend = _BACKENDS[name]
    ok, reason = backend.available(device)
    if ok and dtype is not None and dtype not in backend.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        return False, f"takes {names} inputs, not {str(dtype).replace('torch.', '')}"
    return ok, reason


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Resolution:
    """The concrete backend for a requested name and an input's device and dtype."""
    if name not in ALL_BACKEND_NAMES:
        raise ValueError(f"backend must be one of {ALL_BACKEND_NAMES}, got {name!r}")
    if name == "reference":
        return Resolution(name, "requested")
    if name != "auto":
        ok, reason = backend_status(name, device)
        if not ok:
            raise RuntimeError(f"backend={name!r} is not available on {device}: {reason}")
        ok, reason = backend_status(name, device, dtype)
        if not ok:
            raise ValueError(f"backend={name!r} {reason}; use backend='torch' or 'auto' for such inputs")
        return Resolution(name, "requested")
    passed_over = []
    for candidate in sorted(_BACKENDS.values(), key=lambda b: -b.priority(device, dtype)):
        ok, reason = backend_status(candidate.name, device, dtype)
        if ok and candidate.priority(device, dtype) >= 0:
            why = "; ".join(passed_over) or "the highest-priority backend"
            return Resolution(candidate.name, f"auto on {device.type} for {dtype}: {why}")
        passed_over.append(f"{candidate.name} {reason or 'is for tests only on this device'}")
    return Resolution("reference", "auto: no fused backend available (" + "; ".join(passed_over) + ")")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The name of the concrete backend for a requested name on a device and input dtype."""
    return resolve(name, device, dtype).name
