"""Tile configurations, chosen per kernel (no hidden autotune cache).

BLOCK_M x BLOCK_N is a program's cosine tile, BLOCK_K its step along D. Both kernels run the
same cosine mainloop (tiles.class_cosines). tests/test_triton_compile.py checks that every row
compiles for sm_80 and sm_90 without spills and with wgmma on sm_90. The timings that would
confirm or change them are still to be measured on a GPU (docs/backends/triton.md).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# kernel -> config; the same for every embedding width, as D is walked in BLOCK_K steps. Chosen
# from compiles with the JIT's runtime specialization at the headline shapes (triton 3.8, bf16,
# tests/triton_build.py; the table in docs/backends/triton.md). The forward's online-softmax
# epilogue holds several tile-sized values per thread: 128 x 64 at 8 warps took 228 / 255
# registers (sm_90 / sm_80), one CTA per SM, and even a bare (max, sum-exp) loop takes 139, more
# than the 128 that two 8-warp CTAs allow. 64 x 64 at 4 warps holds as many entries per thread in
# 167 / 168 registers (172 / 217 with label smoothing) without spills: three CTAs per SM on both
# (two with smoothing), one's epilogue under the others' MMAs. BLOCK_K 32 with 4 stages: 64 with 3
# took 12 registers more on sm_90 and spilled on sm_80 while the margin ran in the tile loop.
# The gradient tile keeps 128 x 64: 101 / 128 registers, two CTAs per SM; 128 x 128 compiles
# without spills (159 / 255 registers), a candidate to time on a GPU.
CONFIGS = {
    "forward": TileConfig(64, 64, 32, 4, 4),
    "grad_tile": TileConfig(128, 64, 64, 8, 3),
}
# The NONTARGET variants (the non-target epilogue, docs/design.md section 3c): the forward takes
# 168 / 192 registers (three / two CTAs per SM), 170 / 224 with label smoothing (two); the gradient
# tile 128 on sm_90 but 136 on sm_80, one 8-warp CTA per SM, where capped at 128 it compiles
# without spills: two. The plain kernels take no cap.
NONTARGET_REGISTER_CAP = {"grad_tile": 128}
# Under TRITON_INTERPRET=1 (CPU tests) small tiles keep the interpreter fast and exercise
# several tiles, class splits and chunks on small problems.
INTERPRETER_CONFIG = TileConfig(16, 16, 16, 4, 1)


def tile_config(kernel, interpreted=False):
    return INTERPRETER_CONFIG if interpreted else CONFIGS[kernel]


def register_cap(kernel, nontarget):
    """The launch's maxnreg option for `kernel` ({}: the compiler's choice)."""
    cap = NONTARGET_REGISTER_CAP.get(kernel) if nontarget else None
    return {} if cap is None else dict(maxnreg=cap)
