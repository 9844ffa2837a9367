"""Environment report and a quick self-check of every available backend (`python -m arcface_kernels`)."""

import argparse
import platform
import sys

import torch

from .backends import FUSED_BACKEND_NAMES, backend_status, resolve
from .build_info import extension_status
from .selfcheck import check


def _cpu_epilogue_message():
    """Whether the `torch` backend's CPU chunk loop runs the fused C++ epilogue (arcface_kernels._cpu)."""
    from .backends import chunked
    from .build_info import build_info

    if chunked._CPU_OPS is not None:
        return f"CPU epilogue extension loaded ({chunked._CPU_OPS.vector_isa()} row kernels)"
    info = build_info()
    reason = info.get("cpu_reason", "no build record") if info.get("cpu_extension") != "built" else "built, cannot load"
    return f"CPU epilogue extension not in use ({reason}): the CPU path runs on torch ops"


def _versions(extension_message):
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(extension_message)
    lines.append(_cpu_epilogue_message())
    return lines


def _devices():
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _device_name(device):
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, sm_{cap[0]}{cap[1]})"
    return f"{device} ({platform.processor() or platform.machine()})"


def main(argv=None):
    argparse.ArgumentParser(
        prog="python -m arcface_kernels",
        description="Report the versions, whether the CUDA extension was built and loads (and if not, why), "
                    "and self-check every available backend against the float64 reference on each device. "
                    "Exits 1 if a backend fails its check or the built extension cannot be loaded.").parse_args(argv)
    extension, extension_message = extension_status()
    print("arcface_kernels environment")
    for line in _versions(extension_message):
        print("  " + line)
    healthy = extension != "cannot load"
    for device in _devices():
        print(f"\n{_device_name(device)}")
        for name in FUSED_BACKEND_NAMES:
            ok, reason = backend_status(name, device)
            if name == "cuda" and extension == "cannot load":
                reason = "the extension was built but cannot be loaded (see above)"
            if not ok:
                print(f"  {name:<9} unavailable: {reason}")
                continue
            dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
            dtypes = [d for d in dtypes if backend_status(name, device, d)[0]]
            for dtype in dtypes:
                try:
                    good, errors = check(name, device, dtype)
                except Exception as err:  # report, keep checking the others
                    healthy = False
                    print(f"  {name:<9} {str(dtype):<15} FAILED: {type(err).__name__}: {err}")
                    continue
                healthy &= good
                status = "ok" if good else "MISMATCH"
                print(f"  {name:<9} {str(dtype):<15} {status}  rel. error "
                      + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            choice = resolve("auto", device, dtype)
            print(f"  auto      {str(dtype):<15} -> {choice.name} ({choice.reason})")
    if extension == "cannot load":
        print("\nTHE CUDA EXTENSION WAS BUILT BUT CANNOT BE LOADED: reinstall against the torch you run (above)")
    else:
        print("\nall available backends healthy" if healthy else "\nSOME BACKENDS FAILED THEIR SELF-CHECK")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
