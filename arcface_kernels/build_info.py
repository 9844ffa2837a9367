"""What the build did: setup.py records whether it compiled the CUDA extension `arcface_kernels._C`
and, if not, why (pip hides a successful build's output) in the package's _build_info.json."""

import json
import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")

_UNKNOWN = {"cuda_extension": "unknown", "reason": "no build record (running from a source tree?)"}


def build_info():
    """The build record as a dict: "cuda_extension" is "built", "skipped" or "unknown" (no record),
    "reason" says why; when known also "torch" and "torch_cuda" (the torch it was built against),
    "cuda_home", "archs" (TORCH_CUDA_ARCH_LIST) and "python"."""
    try:
        with open(_PATH) as f:
            record = json.load(f)
    except FileNotFoundError:
        return dict(_UNKNOWN)
    except (OSError, ValueError) as err:
        return {"cuda_extension": "unknown", "reason": f"unreadable build record {_PATH}: {err}"}
    return record if isinstance(record, dict) else {"cuda_extension": "unknown", "reason": f"bad build record {_PATH}"}


def describe():
    """One line for reports: "CUDA extension built (...)" / "CUDA extension skipped: <reason>"."""
    info = build_info()
    state = info.get("cuda_extension", "unknown")
    if state == "built":
        return f"CUDA extension built for {info.get('archs')} against torch {info.get('torch')}"
    return f"CUDA extension {state}: {info.get('reason')}"
