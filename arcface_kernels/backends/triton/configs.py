"""Tile configurations, chosen per kernel and embedding width (no hidden autotune cache).

BLOCK_K is the step along D of the cosine dot products; BLOCK_DOUT the column chunk of dX / dW
one backward program accumulates (its float32 accumulator stays in registers). Starting points
from register and shared-memory budgets: tests/test_triton_compile.py checks that every row
compiles for sm_80 and sm_90 without spills and with wgmma on sm_90. The timings that would
confirm or change them are still to be measured on a GPU (bench/TRITON_NOTES.md).
"""

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    block_dout: int  # backward only
    num_warps: int
    num_stages: int


# kernel -> config; the same for every embedding width, as D is walked in BLOCK_K / BLOCK_DOUT steps.
# The largest tiles found free of register spills for sm_90 with triton 3.8 (see the test):
# 128-wide cosine tiles spill in the margin/softmax epilogue, BLOCK_DOUT = 256 in backward.
CONFIGS = {
    "forward": TileConfig(64, 64, 64, 0, 8, 3),
    "grad_x": TileConfig(64, 64, 32, 128, 8, 2),
    "grad_w": TileConfig(64, 64, 32, 128, 8, 2),
}
# Under TRITON_INTERPRET=1 (CPU tests) small tiles keep the interpreter fast and exercise
# several tiles, class splits and column chunks on small problems.
INTERPRETER_CONFIG = TileConfig(16, 16, 16, 16, 4, 1)


def tile_config(kernel, interpreted=False):
    return INTERPRETER_CONFIG if interpreted else CONFIGS[kernel]


def column_chunks(dim, config):
    return triton.cdiv(dim, config.block_dout)
