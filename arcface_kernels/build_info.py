"""What the build did, and whether its result loads: setup.py records whether it compiled the CUDA
extension `arcface_kernels._C` and, if not, why (pip hides a successful build's output) in the
package's _build_info.json; extension_status() tells "not built (why)" from "built but cannot be
loaded (why, and the fix)"."""

import importlib
import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
_EXTENSION = __package__ + "._C"

_UNKNOWN = {"cuda_extension": "unknown", "reason": "no build record (running from a source tree?)"}

# The fix for an extension that was built but does not load: it links against the C++ ABI of the
# torch it was compiled with, and loads with no other.
REINSTALL = ("reinstall arcface_kernels against the torch you run: install torch first, then "
             "`pip install --no-build-isolation --force-reinstall --no-deps <this package's sdist or checkout>` "
             "(from a checkout: `pip install --no-build-isolation -e .`)")


def build_info():
    """The build record as a dict: "cuda_extension" is "built", "skipped" or "unknown" (no record),
    "reason" says why; when known also "torch" (torch.__version__ at build time), "torch_dist" (its
    version as pip sees it, which a compiled wheel requires exactly), "torch_cuda", "cuda_home",
    "archs" (TORCH_CUDA_ARCH_LIST) and "python"."""
    try:
        with open(_PATH) as f:
            record = json.load(f)
    except FileNotFoundError:
        return dict(_UNKNOWN)
    except (OSError, ValueError) as err:
        return {"cuda_extension": "unknown", "reason": f"unreadable build record {_PATH}: {err}"}
    return record if isinstance(record, dict) else {"cuda_extension": "unknown", "reason": f"bad build record {_PATH}"}


def extension_status():
    """(state, message): state is "loaded", "not built" or "cannot load". "cannot load" means the
    build record says it was built, or its shared object is there, but importing it fails; the
    message then gives the import error, the torch it was built against and the fix."""
    import torch

    info = build_info()
    try:
        module = importlib.import_module(_EXTENSION)
    except ImportError as err:
        present = importlib.util.find_spec(_EXTENSION) is not None
        if info.get("cuda_extension") != "built" and not present:
            return "not built", f"CUDA extension not built: {info.get('reason')}"
        built_against = info.get("torch") or "an unrecorded torch"
        return "cannot load", (f"CUDA extension built (against torch {built_against}; this is torch "
                               f"{torch.__version__}) but cannot be loaded: {err}. Fix: {REINSTALL}")
    against = f" against torch {info['torch']}" if info.get("cuda_extension") == "built" else ""
    code = f"SASS for sm {getattr(module, 'SASS_ARCHS', None)}, PTX {getattr(module, 'PTX_ARCH', None)}"
    return "loaded", f"CUDA extension built{against} and loaded ({code})"

