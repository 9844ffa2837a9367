"""Build script. The CUDA extension (csrc/) is added by `_cuda_extension()` when a CUDA
toolchain and a CUDA build of torch are present; otherwise a pure Python (+ Triton) package
is built and the `cuda` backend reports itself unavailable."""

from setuptools import setup

setup()
