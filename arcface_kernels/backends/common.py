"""Helpers every backend shares: the workspace budget, chunk sizing and the inverse norms."""

import contextlib
import contextvars
import math

import torch

from ..dtypes import KERNEL_DTYPES, compute_dtype
from ..margins import NORM_EPS
from .contract import RowNorms

DEFAULT_WORKSPACE_BUDGET = 64 * 2**20
# Per thread and per asyncio task: a budget set in one never leaks into another.
_workspace_budget = contextvars.ContextVar("arcface_kernels_workspace_budget", default=DEFAULT_WORKSPACE_BUDGET)


def get_workspace_budget() -> int:
    """The current bound, in bytes, on a backend's per-chunk workspace."""
    return _workspace_budget.get()


@contextlib.contextmanager
def workspace_budget(nbytes: int):
    """Bound every chunking backend's per-chunk workspace to `nbytes` inside the block (this thread
    or context only). Results depend on it only through rounding: chunk boundaries set the order
    of the sums, so another budget may change the last bits; the same budget gives the same bits."""
    if isinstance(nbytes, bool) or int(nbytes) != nbytes or int(nbytes) <= 0:
        raise ValueError(f"workspace budget must be a positive number of bytes, got {nbytes!r}")
    token = _workspace_budget.set(int(nbytes))
    try:
        yield
    finally:
        _workspace_budget.reset(token)


def classes_per_chunk(bytes_per_class: int, reserved: int = 0) -> int:
    """How many classes one chunk may hold when each costs `bytes_per_class` of workspace and
    `reserved` bytes of it are taken by buffers that do not grow with the chunk."""
    return max(1, (get_workspace_budget() - reserved) // max(1, bytes_per_class))


# The `torch` backend's tile on a CPU, at most (the workspace budget bounds it too): measured on
# 2 cores (docs/backends/torch.md), 1-4 MiB tiles run 1.4-8x the floor (tens of small ops per
# chunk, each an OpenMP region), 16 MiB and the 64 MiB budget within noise of each other
# (1.28 / 1.05, 1.17 / 1.20, 0.89 / 1.01 of the floor): 16 MiB, for a quarter of the memory.
# On a GPU the budget alone sizes the chunk.
CPU_TILE_BYTES = 16 * 2**20


def tile_classes(bytes_per_class: int, device=None) -> int:
    """The most classes a chunk's tile should hold on `device` for speed (not memory): bounded
    on a CPU by CPU_TILE_BYTES, unbounded elsewhere."""
    if device is not None and torch.device(device).type != "cpu":
        return 2**62
    return max(1, CPU_TILE_BYTES // max(1, bytes_per_class))


# Rows are upcast for their norms a slice at a time: a float32 copy of a bf16 weight with
# millions of rows would be larger than the whole workspace.
_NORM_SLICE_BYTES = 16 * 2**20
# A row whose largest entry is below 2**-64 has a norm below eps for any D < 2**40: clamped anyway.
_MIN_EXPONENT = -64


def _safe_exponent(dtype: torch.dtype) -> int:
    """Rows whose largest entry reaches 2**this are scaled down to it: their squares and their
    dot products with any other such row (D up to 2**30 terms) stay finite in `dtype`."""
    return math.frexp(torch.finfo(dtype).max)[1] // 2 - 16


def _plain_norms(v: torch.Tensor, dtype: torch.dtype):
    """|v_i| in one pass per slice, or None where some row is outside the range in which the plain
    sum of squares is exact to rounding and needs no overflow scaling: norms below 2**(safe - 1)
    (every entry below 2**_safe_exponent, the squares finite) and, unless the row is clamped at
    NORM_EPS anyway, above 2**-40 (squares of entries that matter far above the underflow). The
    usual case: it skips the infinity-norm pass and the scaled copy of every row. CPU only: the
    range check reads the norms: cheap on the CPU, a host sync on a GPU (which has its norm kernel,
    overflow_safe_rows)."""
    if v.device.type != "cpu":
        return None
    step = max(1, _NORM_SLICE_BYTES // (max(v.shape[1], 1) * 8))
    if v.shape[0] <= step:
        norms = torch.linalg.vector_norm(v, dim=1, dtype=dtype)
    else:
        norms = torch.empty(v.shape[0], dtype=dtype, device=v.device)
        for start in range(0, v.shape[0], step):
            norms[start : start + step] = torch.linalg.vector_norm(v[start : start + step], dim=1, dtype=dtype)
    if norms.numel() == 0:
        return norms
    high = 2.0 ** (_safe_exponent(dtype) - 1)
    low = min(2.0**-40, NORM_EPS)
    smallest, largest = (float(v) for v in torch.aminmax(norms))  # a host read (no stack: a small head's fixed cost)
    if not largest < high:  # NaN included: the careful path decides
        return None
    if smallest > low or bool(((norms > low) | (norms == 0)).all()):
        return norms
    return None


def _exponents_and_unit_norms(v: torch.Tensor, dtype: torch.dtype):
    """Per row, e with max_k |v_ik| = m 2**e (m in [0.5, 1)) and |v_i| / 2**e, the norm taken of the
    row scaled by 2**-e (exact): no square overflows or underflows, whatever the row's magnitude."""
    # float exponents (exact small integers): an int32 buffer here miscompiles in inductor's CPU
    # code for dynamic shapes (torch 2.14)
    exponents = torch.empty(v.shape[0], dtype=dtype, device=v.device)
    unit_norms = torch.empty(v.shape[0], dtype=dtype, device=v.device)
    step = max(1, _NORM_SLICE_BYTES // (max(v.shape[1], 1) * 8))
    for start in range(0, v.shape[0], step):
        rows = v[start : start + step].to(dtype)
        peak = torch.linalg.vector_norm(rows, ord=math.inf, dim=1)
        e = torch.frexp(peak).exponent.to(dtype).clamp_min(_MIN_EXPONENT)
        exponents[start : start + step] = e
        unit_norms[start : start + step] = torch.linalg.vector_norm(rows * torch.exp2(-e)[:, None], dim=1)
    return exponents, unit_norms


def _clamped_inverse(norms: torch.Tensor) -> torch.Tensor:
    """1 / max(|v_i|, eps) per row (F.normalize's clamp), in two ops where `1.0 / t` takes three
    (torch makes it a reciprocal times 1.0: the same bits)."""
    return norms.clamp_min(NORM_EPS).reciprocal()


def _inverse(unit_norms, exponents, dtype):
    return _clamped_inverse(unit_norms * torch.exp2(exponents))


def inverse_norms(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(|v_i|, eps) per row, in `dtype`, with no overflow in the squares (a row's norm
    may exceed `dtype`'s range only if its entries nearly do)."""
    plain = _plain_norms(v, dtype)
    if plain is not None:
        return _clamped_inverse(plain)
    exponents, unit_norms = _exponents_and_unit_norms(v, dtype)
    return _inverse(unit_norms, exponents, dtype)


def _overflow_shifts(exponents, dtype):
    return (exponents - _safe_exponent(dtype)).clamp_min(0)


def overflow_scales(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per row, the power of two (1 for all but huge rows) that overflow_safe_rows multiplies it by."""
    exponents, _ = _exponents_and_unit_norms(v, dtype)
    return torch.exp2(-_overflow_shifts(exponents, dtype))


def device_rule(v: torch.Tensor) -> bool:
    """Whether v's rows are taken with no host read (on a GPU: docs/design.md section 2, "Norms and
    overflow"); on the CPU a host read is cheap and the op reads."""
    return v.device.type == "cuda"


def _norm_kernel(v: torch.Tensor, dtype: torch.dtype):
    """triton/norms.py where it computes v's norm pass (device_rule, a kernel dtype, float32
    statistics, Triton importable), else None (the CPU, float64, no Triton: the ATen path)."""
    if not device_rule(v) or v.dtype not in KERNEL_DTYPES or dtype != torch.float32:
        return None
    try:
        from .triton import norms
    except ImportError:
        return None
    return norms


def may_hold_huge_rows(v_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Can a row of `v_dtype` reach 2**_safe_exponent(dtype)? Never for float16 (largest 65504)
    with float32 statistics: no row of it is ever scaled."""
    return torch.finfo(v_dtype).max >= 2.0 ** _safe_exponent(dtype)


def dot_headroom(dim: int) -> int:
    """h with 2**h >= 2 dim: a row whose entries are all below 2**-h has, with any row of `dim`
    finite entries, a dot product below half the largest finite value (docs/design.md eq. (6b))."""
    return max(int(dim) - 1, 0).bit_length() + 1


def sync_free_rule(v: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether overflow_safe_rows(v, dtype, sync_free=True) runs the norm kernel and reads nothing
    back (a GPU, a kernel dtype, float32 statistics, Triton importable)."""
    return _norm_kernel(v, dtype) is not None


def headroom_scaled(v_dtype: torch.dtype, dtype: torch.dtype, headroom: bool) -> bool:
    """Whether the sync-free rule sees rows of v_dtype scaled down for headroom (the embeddings,
    of a dtype that can hold a huge row), rather than as given."""
    return headroom and may_hold_huge_rows(v_dtype, dtype)


# norms.seen_rows' limit that scales no row: past the exponent of every finite value (and of inf)
_NO_SHIFT = 129


def overflow_safe_rows(v: torch.Tensor, dtype: torch.dtype, sync_free: bool = False, headroom: bool = False):
    """The rows a backend sees, their inverse norms in `dtype`, and the per-row scale that made them.

    Rows whose largest entry reaches 2**_safe_exponent are multiplied by a power of two (exact)
    that brings it below: cosines are unchanged, and no raw dot product of two rows overflows
    the accumulation dtype (docs/design.md section 2, "never NaN or Inf for finite inputs"). The
    gradient with respect to the given row is the scale times the one with respect to the seen
    row. The scale is None where every row is seen as given (sync_free on a GPU: the kernel's
    scales, all 1 for rows seen as given, so that no launch makes them).

    On a GPU the norm pass is one kernel (triton/norms.py). sync_free (the op's training step)
    reads nothing back, so it decides nothing from the values: where v's dtype can hold a huge
    row (may_hold_huge_rows), the embeddings (headroom=True) are always seen scaled down to entries
    below 2**-dot_headroom(D), a copy the kernel writes in the same pass (N x D), so that their dot
    product with any finite class row is finite, and the class rows (headroom=False) are seen as
    given, with their exact inverse norms: no C x D copy (docs/design.md section 2, "Norms and
    overflow"). Otherwise (and always on the CPU, where a host read is cheap) the copy is made
    only when some row needs it: one host read to know.
    """
    kernel = _norm_kernel(v, dtype)
    if kernel is not None:
        if sync_free:
            scaled = headroom_scaled(v.dtype, dtype, headroom)
            limit = -dot_headroom(v.shape[1]) if scaled else _NO_SHIFT
            return kernel.seen_rows(v, limit, _MIN_EXPONENT, NORM_EPS, scaled)
        seen, inverse, scale = kernel.seen_rows(v, _safe_exponent(dtype), _MIN_EXPONENT, NORM_EPS, False)
        if not may_hold_huge_rows(v.dtype, dtype) or not bool((scale != 1).any()):  # the host read
            return v, inverse, None
        return v * scale[:, None].to(v.dtype), inverse, scale
    plain = _plain_norms(v, dtype)
    if plain is not None:  # no row near overflow: nothing to scale
        return v, _clamped_inverse(plain), None
    exponents, unit_norms = _exponents_and_unit_norms(v, dtype)
    shift = _overflow_shifts(exponents, dtype)
    inverse = _inverse(unit_norms, exponents - shift, dtype)
    if not bool(shift.any()):
        return v, inverse, None
    scale = torch.exp2(-shift)
    return v * scale[:, None].to(v.dtype), inverse, scale


def row_norms(x: torch.Tensor, w: torch.Tensor) -> RowNorms:
    """The inverse norms of embeddings and class rows, once per call (contract.RowNorms)."""
    dtype = compute_dtype(x.dtype)
    return RowNorms(inverse_norms(x, dtype), inverse_norms(w, dtype))


def float32_matmul_uses_tf32() -> bool:
    """torch's own setting for float32 CUDA matmuls. torch.backends.cuda.matmul.fp32_precision
    ("tf32", "ieee", or "none" when unset; the legacy allow_tf32 and
    torch.set_float32_matmul_precision set it too) where torch has it; allow_tf32 on a torch
    without it. Reading allow_tf32 raises on a recent torch once the new API has been used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return bool(matmul.allow_tf32) if precision is None else precision == "tf32"


def projection_factor(r: torch.Tensor) -> torch.Tensor:
    """r where the row's norm exceeds eps, else 0: the factor of the normalized row v r in the
    normalization term of the gradient (docs/design.md eqs. (23)-(24b)), which F.normalize drops
    for rows clamped at eps."""
    return torch.where(r < 1.0 / NORM_EPS, r, 0.0)


def projection_scale(r: torch.Tensor) -> torch.Tensor:
    """projection_factor(r)^2: the weight of (v . grad) v in the normalization term (eqs. (23)-(24)),
    for rows whose r^2 is within the dtype's range (the `torch` backend's dX: seen embeddings)."""
    f = projection_factor(r)
    return f * f
