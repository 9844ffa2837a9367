"""The backends: each computes the contract of contract.py; registry.py turns a requested name
into one of them.

reference  plain PyTorch that materializes N x C: the test oracle (reference.py)
torch      class-chunked PyTorch, any device and dtype (chunked.py; on a CPU also row_blocks.py)
triton     fused Triton kernels (triton/)
cuda       cuBLAS GEMMs with fused CUDA epilogues, the compiled extension (cuda.py, csrc/)
"""

from .common import get_workspace_budget, row_norms, workspace_budget
from .contract import Backend, PartialStats, RowNorms
from .registry import (
    ALL_BACKEND_NAMES,
    FUSED_BACKEND_NAMES,
    backend_status,
    get_backend,
    load_backends,
    register_backend,
    resolve,
    resolve_backend,
)

load_backends()

__all__ = [
    "ALL_BACKEND_NAMES", "FUSED_BACKEND_NAMES", "Backend", "PartialStats", "RowNorms", "row_norms",
    "backend_status", "get_backend", "get_workspace_budget", "load_backends", "register_backend", "resolve",
    "resolve_backend", "workspace_budget",
]
