"""Import the GPU backends that may be missing (no Triton, extension not built), recording why."""

import importlib

from .registry import mark_unavailable

# backend name -> module that registers it on import
OPTIONAL_BACKENDS = {"triton": ".triton_backend", "cuda": ".cuda_backend"}


def load_optional_backends():
    for name, module in OPTIONAL_BACKENDS.items():
        try:
            importlib.import_module(module, __package__)
        except ModuleNotFoundError as err:
            mark_unavailable(name, f"not installed ({err})")
        except Exception as err:  # a broken backend must not break the package
            mark_unavailable(name, f"failed to load: {type(err).__name__}: {err}")
