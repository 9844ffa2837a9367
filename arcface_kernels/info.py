"""Environment report and a quick self-check of every available backend (`python -m arcface_kernels`)."""

import argparse
import platform
import sys

import torch

from .api import margin_softmax_loss
from .backends import FUSED_BACKEND_NAMES, backend_status, resolve
from .build_info import extension_status


def _versions(extension_message):
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(extension_message)
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


def self_check(backend, device, dtype=torch.float32, seed=0):
    """Relative errors of loss, dX, dW against the float64 reference on a small odd-sized problem."""
    g = torch.Generator().manual_seed(seed)
    n, c, d, k = 37, 301, 24, 2
    x = torch.randn(n, d, generator=g)
    w = torch.randn(c * k, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    y[5] = -100
    options = dict(sub_centers=k, label_smoothing=0.1, m1=1.05, m2=0.3, m3=0.1)
    results = []
    for name, xx, ww in ((backend, x.to(device, dtype), w.to(device, dtype)),
                         ("reference", x.double().to(device), w.double().to(device))):
        xx.requires_grad_(True)
        ww.requires_grad_(True)
        loss = margin_softmax_loss(xx, ww, y.to(device), backend=name, **options)
        loss.backward()
        results.append([t.detach().double().cpu() for t in (loss, xx.grad, ww.grad)])
    return [float((a - b).norm() / b.norm()) for a, b in zip(*results)]


# Relative-error bound of the self-check per dtype.
_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


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
                    errors = self_check(name, device, dtype)
                except Exception as err:  # report, keep checking the others
                    healthy = False
                    print(f"  {name:<9} {str(dtype):<15} FAILED: {type(err).__name__}: {err}")
                    continue
                good = max(errors) <= _TOLERANCE[dtype]
                healthy &= good
                status = "ok" if good else "MISMATCH"
                print(f"  {name:<9} {str(dtype):<15} {status}  rel. error loss {errors[0]:.1e}, "
                      f"dX {errors[1]:.1e}, dW {errors[2]:.1e}")
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
