"""Build script: the Python package, plus the CUDA extension `arcface_kernels._C` (csrc/) when a
CUDA toolchain and a CUDA build of torch are present, and the CPU extension `arcface_kernels._cpu`
(the `torch` backend's fused CPU epilogue, csrc/cpu_epilogue*.cpp) when a C++ compiler is, with
or without CUDA.

ARCFACE_KERNELS_BUILD_CUDA=0 skips the extension, =1 requires it (the build fails without a
toolchain); unset, it is built when possible and skipped otherwise. Without it the package still
works: the `cuda` backend then reports "extension not built". ARCFACE_KERNELS_BUILD_CPU does the
same for `_cpu`; without it the `torch` backend runs on torch ops alone. The extensions are compiled against
the torch that is importable while this runs, so install torch first and build with
`pip install --no-build-isolation` (an isolated build would compile against a throwaway torch).

pip hides the output of a successful build, so the outcome (built or skipped, and why) is also
written into the package as arcface_kernels/_build_info.json: arcface_kernels.build_info.build_info()
reads it.

A build that compiles an extension requires the exact torch it was compiled against (the version
pip sees in torch's metadata, local tag included when it has one, e.g. "torch==2.14.1" or
"torch==2.14.1+cu130"): the extension links against that torch's C++ ABI and loads with no other.
A build without it (and the sdist, which compiles nothing) keeps the loose range.
"""

import json
import os
import platform
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join("arcface_kernels", "_build_info.json")  # generated, gitignored, package data

TORCH_RANGE = "torch>=2.5"  # what the pure-Python package runs with

# SASS for Turing, Ampere (sm_80 code runs on sm_86 and Ada's sm_89 too: same major) and Hopper,
# and PTX of the newest for later GPUs to JIT (docs/backends/cuda.md); TORCH_CUDA_ARCH_LIST
# overrides it. sm_86 / sm_89 builds of their own would add two compiles (about 100 s of a 2-core
# CI build) for no instruction these kernels use.
ARCHS = "7.5;8.0;9.0+PTX"


def _log(message):
    print(f"arcface_kernels setup: {message}", file=sys.stderr)


def _is_cuda_toolkit(home):
    """Is `home` a CUDA toolkit root: an executable bin/nvcc and the runtime headers?"""
    nvcc = os.path.join(home, "bin", "nvcc")
    return (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")))


def _cuda_home_candidates():
    """(source, path) candidates for the CUDA toolkit root, best first: CUDA_HOME / CUDA_PATH, the
    root torch.utils.cpp_extension settled on, then through nvcc on PATH, which may be a wrapper
    script that execs the real nvcc (read the path out of it) or a link into the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield var, os.environ[var]
    try:
        from torch.utils import cpp_extension
    except ImportError:  # no torch: the toolkit can still be found through nvcc
        pass
    else:
        if cpp_extension.CUDA_HOME:
            yield "torch.utils.cpp_extension.CUDA_HOME", cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper script
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        if match:
            yield f"the nvcc wrapper {nvcc}", match.group(1).decode()
    yield f"nvcc on PATH ({real})", os.path.dirname(os.path.dirname(real))


def _find_cuda_home():
    """(root, tried): the first candidate that is a CUDA toolkit (None if none is), and what was
    tried, as "source: path" lines."""
    tried = []
    for source, home in _cuda_home_candidates():
        home = os.path.abspath(home)
        if _is_cuda_toolkit(home):
            return home, tried
        tried.append(f"{source}: {home} (no bin/nvcc or include/cuda_runtime.h)")
    return None, tried


def _cuda_home():
    """The CUDA toolkit root (None if there is none): the first of the candidates above that has
    bin/nvcc and include/cuda_runtime.h."""
    return _find_cuda_home()[0]


def _ptx_arch(arch_list):
    """The newest architecture of a TORCH_CUDA_ARCH_LIST that is also embedded as PTX (entries
    like "9.0+PTX"), as 10 * major + minor; 0 if none. The extension reports it (_C.PTX_ARCH)."""
    entries = re.split(r"[;\s]+", arch_list.strip())
    ptx = [round(10 * float(e[: -len("+PTX")])) for e in entries if e.endswith("+PTX")]
    return max(ptx, default=0)


def _cuda_extension():
    """(extension or None, cmdclass, record): the record is what _build_info.json says."""
    wanted = os.environ.get("ARCFACE_KERNELS_BUILD_CUDA")
    record = {"cuda_extension": "skipped", "reason": "", "torch": None, "torch_dist": None, "torch_cuda": None,
              "cuda_home": None, "archs": None, "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        record.update(torch=torch.__version__, torch_dist=_installed_torch_version(torch),
                      torch_cuda=torch.version.cuda)
    if wanted == "0":
        reason = "ARCFACE_KERNELS_BUILD_CUDA=0"
    elif torch is None:
        reason = ("torch not importable at build time: install torch first, then this package with "
                  "pip install --no-build-isolation")
    else:
        home, tried = _find_cuda_home()
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a build without CUDA"
        elif home is None:
            reason = "no CUDA toolkit found (install one, put its nvcc on PATH or set CUDA_HOME)"
            if tried:
                reason += "; tried " + "; ".join(tried)
        else:
            from torch.utils import cpp_extension

            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home  # torch guessed it at import time, maybe wrongly
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
            record.update(cuda_extension="built", cuda_home=home, archs=os.environ["TORCH_CUDA_ARCH_LIST"],
                          reason=f"compiled with the CUDA toolkit in {home}")
            temp = os.path.join(ROOT, "build", f"temp-cuda-{sys.implementation.cache_tag}-torch{torch.__version__}")
            return extension, {"build_ext": _persistent_build_temp(BuildExtension, temp)}, record
    if wanted == "1":
        raise RuntimeError(f"ARCFACE_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _log(f"skipping the CUDA extension: {reason}")
    record["reason"] = reason
    return None, {}, record


CPU_SOURCES = ["csrc/cpu_epilogue.cpp", "csrc/cpu_epilogue_avx2.cpp", "csrc/cpu_row_blocks.cpp",
               "csrc/cpu_bf16_gemm.cpp"]


def _cpu_extension(record):
    """(extension or None, cmdclass): the CPU epilogue as its own module, arcface_kernels._cpu, so
    that a CPU-only build leaves `_C` (and what reports it) as it was. Records "cpu_extension"
    ("built" or "skipped") and "cpu_reason" in `record`."""
    wanted = os.environ.get("ARCFACE_KERNELS_BUILD_CPU")
    compiler = os.environ.get("CXX", "c++")
    if wanted == "0":
        reason = "ARCFACE_KERNELS_BUILD_CPU=0"
    elif record["torch"] is None:
        reason = "torch not importable at build time"
    elif shutil.which(compiler) is None:
        reason = f"no C++ compiler ({compiler} not found; set CXX)"
    else:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        record.update(cpu_extension="built", cpu_reason=f"compiled with {compiler}")
        extension = CppExtension("arcface_kernels._cpu", CPU_SOURCES, extra_compile_args=["-O3"], py_limited_api=False)
        import torch

        temp = os.path.join(ROOT, "build", f"temp-cpu-{sys.implementation.cache_tag}-torch{torch.__version__}")
        return extension, {"build_ext": _persistent_build_temp(BuildExtension, temp)}
    if wanted == "1":
        raise RuntimeError(f"ARCFACE_KERNELS_BUILD_CPU=1 but the CPU extension cannot be built: {reason}")
    _log(f"skipping the CPU extension: {reason}")
    record.update(cpu_extension="skipped", cpu_reason=reason)
    return None, {}


def _installed_torch_version(torch):
    """The version of the installed torch as pip sees it (its distribution metadata: "2.14.1" for
    PyPI's default CUDA build, whose torch.__version__ says "2.14.1+cu130"; "2.14.1+cu126" for a
    wheel from PyTorch's own index); torch.__version__ when no metadata is found (a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return torch.__version__


def torch_requirement(record):
    """The torch requirement of a build described by `record`: the exact torch a compiled extension
    was built against, else the loose range."""
    if record["cuda_extension"] == "built" or record.get("cpu_extension") == "built":
        return f"torch=={record['torch_dist']}"
    return TORCH_RANGE


def _persistent_build_temp(build_extension, temp):
    """BuildExtension (with ninja) compiling into `temp`, kept between builds: an editable install
    compiles in a fresh temporary directory each time; here ninja recompiles only what changed
    (its commands and header dependencies are tracked), across editable installs and pip wheel."""

    class BuildExt(build_extension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = temp

    return BuildExt


def _with_build_record(record):
    """build_py that also writes `record` as arcface_kernels/_build_info.json: into the build tree
    (so a wheel carries it), or into the source tree for an editable install, which imports from
    there."""

    class BuildPy(build_py):
        def run(self):
            super().run()
            base = ROOT if getattr(self, "editable_mode", False) else self.build_lib
            path = os.path.join(base, BUILD_INFO)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
            _log(f"wrote {path}")

    return BuildPy


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import _cuda_home
    if "sdist" in sys.argv[1:]:  # the source archive compiles nothing: its metadata keeps the range
        setup(install_requires=[TORCH_RANGE])
    else:
        extension, cmdclass, record = _cuda_extension()
        cpu_extension, cpu_cmdclass = _cpu_extension(record)
        _log(f"CUDA extension {record['cuda_extension']}: {record['reason']}; CPU extension "
             f"{record['cpu_extension']}: {record['cpu_reason']}; requires {torch_requirement(record)}")
        setup(ext_modules=[e for e in (extension, cpu_extension) if e], install_requires=[torch_requirement(record)],
              cmdclass={**cpu_cmdclass, **cmdclass, "build_py": _with_build_record(record)})
