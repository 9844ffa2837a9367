"""Build script: the Python package, plus the CUDA extension `arcface_kernels._C` (csrc/) when a
CUDA toolchain and a CUDA build of torch are present.

ARCFACE_KERNELS_BUILD_CUDA=0 skips the extension, =1 requires it (the build fails without a
toolchain); unset, it is built when possible and skipped with a message otherwise. Without it
the package still works: the `cuda` backend then reports "extension not built".
"""

import os
import re
import shutil
import sys

from setuptools import setup

# SASS for Turing, Ampere, Ada and Hopper, and PTX of the newest for later GPUs to JIT
# (docs/backends/cuda.md); TORCH_CUDA_ARCH_LIST overrides it.
ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _log(message):
    print(f"arcface_kernels setup: {message}", file=sys.stderr)


def _cuda_home():
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, else found through nvcc on PATH (which may be
    a wrapper script that execs the real nvcc: read the path out of it)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper script
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        if match and os.path.isdir(match.group(1)):
            return match.group(1).decode()
    return os.path.dirname(os.path.dirname(real))


def _ptx_arch(arch_list):
    """The newest architecture of a TORCH_CUDA_ARCH_LIST that is also embedded as PTX (entries
    like "9.0+PTX"), as 10 * major + minor; 0 if none. The extension reports it (_C.PTX_ARCH)."""
    entries = re.split(r"[;\s]+", arch_list.strip())
    ptx = [round(10 * float(e[: -len("+PTX")])) for e in entries if e.endswith("+PTX")]
    return max(ptx, default=0)


def _cuda_extension():
    wanted = os.environ.get("ARCFACE_KERNELS_BUILD_CUDA")
    if wanted == "0":
        _log("ARCFACE_KERNELS_BUILD_CUDA=0: skipping the CUDA extension")
        return None, {}
    try:
        import torch
    except ImportError:
        reason = "torch is not importable at build time (use pip install --no-build-isolation)"
    else:
        home = _cuda_home()
        if torch.version.cuda is None:
            reason = "this torch build has no CUDA"
        elif home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
            reason = "no CUDA toolkit found (nvcc / CUDA_HOME)"
        else:
            os.environ["CUDA_HOME"] = home
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ARCHS)
            os.environ.setdefault("MAX_JOBS", "2")
            from torch.utils.cpp_extension import BuildExtension, CUDAExtension

            _log(f"building the CUDA extension with {home} for sm {os.environ['TORCH_CUDA_ARCH_LIST']}")
            ptx = _ptx_arch(os.environ["TORCH_CUDA_ARCH_LIST"])
            extension = CUDAExtension(
                "arcface_kernels._C",
                ["csrc/binding.cpp", "csrc/forward.cu", "csrc/backward.cu", "csrc/build_info.cu"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", f"-DARCFACE_KERNELS_PTX_ARCH={ptx}"]},
                py_limited_api=False,
            )
            return extension, {"build_ext": BuildExtension.with_options(use_ninja=True)}
    if wanted == "1":
        raise RuntimeError(f"ARCFACE_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _log(f"skipping the CUDA extension: {reason}")
    return None, {}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import _cuda_home
    extension, cmdclass = _cuda_extension()
    setup(ext_modules=[extension] if extension else [], cmdclass=cmdclass)
