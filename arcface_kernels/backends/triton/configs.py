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


# kernel -> config; the same for every embedding width, as D is walked in BLOCK_K steps. The
# largest tiles that compile without spills on both sm_80 and sm_90 with the JIT's runtime
# specialization (triton 3.8, bf16, tests/triton_build.py): 128 x 128 spills on sm_80 in the
# forward (the online-softmax epilogue holds many live values per entry), so it takes 128 x 64.
# The gradient tile keeps 128 x 64 too: since it no longer evaluates dphi/dc, 128 x 128 compiles
# without spills (254 / 255 registers on sm_90 / sm_80), a candidate to time on a GPU.
CONFIGS = {
    "forward": TileConfig(128, 64, 64, 8, 3),
    "grad_tile": TileConfig(128, 64, 64, 8, 3),
}
# Under TRITON_INTERPRET=1 (CPU tests) small tiles keep the interpreter fast and exercise
# several tiles, class splits and chunks on small problems.
INTERPRETER_CONFIG = TileConfig(16, 16, 16, 4, 1)


def tile_config(kernel, interpreted=False):
    return INTERPRETER_CONFIG if interpreted else CONFIGS[kernel]
