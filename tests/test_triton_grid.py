"""The forward's grid rule (no GPU, no compile): how many programs of a compiled kernel an SM
holds, and class splits that fill whole waves of them (triton.ctas_per_sm, triton.class_splits)."""

import types

import pytest
import triton
from launch_probe import H100

from arcface_kernels.backends import triton as triton_backend

A100 = types.SimpleNamespace(multi_processor_count=108, regs_per_multiprocessor=65536,
                             shared_memory_per_multiprocessor=164 * 1024, max_threads_per_multi_processor=2048)


@pytest.mark.parametrize("registers, shared, warps, props, expected", [
    (228, 73728, 8, H100, 1),  # the old 128 x 64 forward: 232 x 256 registers, one CTA
    (128, 73728, 8, H100, 2),  # 128 registers at 8 warps: two
    (129, 0, 8, H100, 1),  # rounded up to 136: one
    (216, 32768, 4, H100, 2),  # 64 x 64 at 4 warps: 216 x 128 registers, two
    (167, 32768, 4, H100, 3),  # the forward: 168 x 128, three
    (64, 73728, 8, H100, 3),  # shared memory (72 + 1 KiB reserved per CTA) bounds it: three
    (64, 73728, 8, A100, 2),
    (32, 0, 8, H100, 8),  # the thread limit: 2048 / 256
])
def test_ctas_per_sm(registers, shared, warps, props, expected):
    assert triton_backend.ctas_per_sm(registers, shared, warps, props) == expected


def _tiles_walked(row_blocks, per_split_tiles, splits, wave):
    return triton.cdiv(row_blocks * splits, wave) * per_split_tiles


@pytest.mark.parametrize("n, c, wave", [(4096, 262144, 264), (4096, 262144, 132), (512, 93431, 264),
                                        (1024, 2059906, 216), (100, 1000, 264), (20000, 5003, 132)])
def test_class_splits_cover_the_classes_in_whole_tiles_and_waves(n, c, wave):
    block_m, block_n = 64, 64
    row_blocks, tiles = triton.cdiv(n, block_m), triton.cdiv(c, block_n)
    per_split, splits = triton_backend.class_splits(row_blocks, c, block_n, wave)
    assert per_split % block_n == 0 and (splits - 1) * per_split < c <= splits * per_split
    walked = _tiles_walked(row_blocks, per_split // block_n, splits, wave)
    # no worse than one split, nor than the old rule (4 programs per SM of 132, whatever the occupancy)
    assert walked <= _tiles_walked(row_blocks, tiles, 1, wave)
    old = max(1, min(triton.cdiv(4 * 132, row_blocks), tiles))
    old_per_split = triton.cdiv(tiles, old)
    assert walked <= _tiles_walked(row_blocks, old_per_split, triton.cdiv(tiles, old_per_split), wave)
    # within 10% of the ideal (every SM busy to the end) when the grid can fill a wave
    if row_blocks * tiles >= 4 * wave:
        assert walked <= 1.1 * row_blocks * tiles / wave


def test_headline_grid_is_one_full_wave_on_an_h100():
    # three CTAs per SM on 132 SMs: 64 row blocks x 6 splits = 384 programs of 683 class tiles
    # each (the ideal: 662); the old rule's 64 x 9 = 576 programs (2 waves of 396 x 456 tiles)
    # walk 912. At two CTAs per SM: 64 x 4 = 256 programs of 1,024 tiles.
    assert triton_backend.class_splits(64, 262144, 64, 396) == (683 * 64, 6)
    assert triton_backend.class_splits(64, 262144, 64, 264) == (65536, 4)
