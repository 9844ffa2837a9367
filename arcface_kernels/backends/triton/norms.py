"""The norm pass on a GPU: one kernel per matrix (docs/design.md section 2, "Norms and overflow").

Per row i of v (float16, bfloat16 or float32), with e_i the exponent of its largest entry
(max_k |v_ik| = m 2**e_i, m in [0.5, 1), e_i >= min_exponent) and shift_i = max(e_i - limit, 0):
rows whose largest entry reaches 2**limit are scaled below it (limit = the caller's: the safe
exponent, huge rows only; minus the dot headroom, every embedding; 129, none):

    scale_i   = 2**-shift_i                     a float32 power of two (subnormal for some rows)
    inverse_i = 1 / max(|v_i| scale_i, eps)     the inverse norm of the seen row v_i scale_i,
                                                correctly rounded where normal (subnormal for a
                                                seen norm past 2**126)
    seen_i    = v_i scale_i                     written only when asked (exact but where subnormal)

in float32, from one read of the row: the sum of squares is kept of the row scaled by 2**-e,
e the largest exponent seen so far, and rescaled by a power of two when a later block of columns
raises it (an online power-of-two rescaling), so that no square overflows or underflows however
large or tiny the row; powers of two are built from their bits, never by exp2, and one outside
float32's normal range is applied as two exact factors. No float32 copy
of the matrix, no host read: backends/common.py decides nothing from the values on a GPU.
"""

import torch
import triton
import triton.language as tl

# Columns per block; a row is walked in blocks of at most this many.
_MAX_BLOCK_D = 1024
# Entries per program (rows x columns of one block).
_BLOCK_ENTRIES = 4096


@triton.jit
def _pow2(k):
    """2.0**k as float32 for integer k in [-126, 127], exactly (the exponent field's bits)."""
    return ((k + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(peak, MIN_EXPONENT: tl.constexpr):
    """e with peak = m 2**e, m in [0.5, 1), for peak >= 2**MIN_EXPONENT; MIN_EXPONENT below that
    (zero and subnormal included). inf and NaN give 129."""
    biased = (peak.to(tl.int32, bitcast=True) >> 23) & 255
    return tl.maximum(biased - 126, MIN_EXPONENT)


@triton.jit
def row_norms_kernel(v_ptr, seen_ptr, inverse_ptr, scale_ptr, R, D, stride_v, stride_seen, eps,
                     LIMIT: tl.constexpr, MIN_EXPONENT: tl.constexpr, WRITE_SEEN: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    r64 = rows[:, None].to(tl.int64)
    exponent = tl.full((BLOCK_R,), MIN_EXPONENT, tl.int32)
    sum_sq = tl.zeros((BLOCK_R,), tl.float32)  # sum of (v / 2**exponent)**2
    for first in range(0, D, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        v = tl.load(v_ptr + r64 * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        raised = tl.maximum(exponent, _exponent(tl.max(tl.abs(v), axis=1), MIN_EXPONENT))
        # the sum so far, rescaled to the new exponent (a factor below 2**-126 leaves nothing
        # that a term of the new peak block, at least 1/4, would not round away)
        drop = 2 * (exponent - raised)
        sum_sq = tl.where(drop < -126, 0.0, sum_sq * _pow2(tl.maximum(drop, -126)))
        # v / 2**raised in two exact steps: 2**-raised alone is subnormal for raised > 126
        half = -raised // 2
        unit = v * _pow2(half)[:, None] * _pow2(-raised - half)[:, None]
        sum_sq += tl.sum(unit * unit, axis=1)
        exponent = raised
    shift = tl.maximum(exponent - LIMIT, 0)
    # 2**-shift (shift up to 149) as two factors in float32's normal range
    scale_hi = _pow2(-(shift // 2))
    scale_lo = _pow2(shift // 2 - shift)
    # |seen| = unit_norm 2**seen_exp, unit_norm in [0.5, sqrt(D)]; its inverse as 1 / unit_norm
    # times two powers of two (the same bits as 1 / |seen| wherever that is normal, and no
    # 1 / inf = 0 for a norm past float32's range)
    unit_norm = tl.sqrt_rn(sum_sq)
    seen_exp = exponent - shift
    # the eps clamp (a norm of 2**(seen_exp - 1) > 1/2 and more is far above eps); NaN stays NaN (a
    # maximum could drop it): non-finite inputs propagate
    clamped = unit_norm * _pow2(tl.minimum(seen_exp, 0)) < eps
    half_exp = seen_exp // 2
    unclamped = tl.math.div_rn(1.0, tl.where(clamped, 1.0, unit_norm)) * _pow2(-half_exp) * _pow2(half_exp - seen_exp)
    inverse = tl.where(clamped, tl.math.div_rn(1.0, eps), unclamped)
    tl.store(inverse_ptr + rows, inverse, mask=row_mask)
    tl.store(scale_ptr + rows, scale_hi * scale_lo, mask=row_mask)
    if WRITE_SEEN:
        for first in range(0, D, BLOCK_D):
            cols = first + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < D)[None, :]
            v = tl.load(v_ptr + r64 * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            seen = v * scale_hi[:, None] * scale_lo[:, None]
            tl.store(seen_ptr + r64 * stride_seen + cols[None, :], seen.to(seen_ptr.dtype.element_ty), mask=mask)


def launch_shape(dim: int):
    """(BLOCK_R, BLOCK_D) of row_norms_kernel for rows of `dim` entries."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), _MAX_BLOCK_D)
    return max(1, _BLOCK_ENTRIES // block_d), block_d


def seen_rows(v, limit: int, min_exponent: int, eps: float, write_seen: bool):
    """(seen rows, float32 inverse norms, float32 scales) of a CUDA matrix v (module docstring) in
    one launch; the seen rows are v itself unless write_seen (then a new tensor of v's dtype)."""
    from . import _on_device

    v = v if v.stride(1) == 1 else v.contiguous()
    rows, dim = v.shape
    inverse = torch.empty(rows, dtype=torch.float32, device=v.device)
    scale = torch.empty(rows, dtype=torch.float32, device=v.device)
    seen = torch.empty_like(v, memory_format=torch.contiguous_format) if write_seen else v
    if rows:
        block_r, block_d = launch_shape(dim)
        with _on_device(v.device):
            row_norms_kernel[(triton.cdiv(rows, block_r),)](
                v, seen, inverse, scale, rows, dim, v.stride(0), seen.stride(0), eps, LIMIT=limit,
                MIN_EXPONENT=min_exponent, WRITE_SEEN=write_seen, BLOCK_R=block_r, BLOCK_D=block_d)
    return seen, inverse, scale
