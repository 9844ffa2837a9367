"""The triton backend under TRITON_INTERPRET=1 with the tile shapes a GPU runs (configs.CONFIGS),
not the interpreter's small ones: problems that still span several row blocks, class tiles,
splits and backward chunks, against the float64 reference (run by test_triton_interpreter.py)."""

import os

import pytest
import torch

import arcface_kernels as ak
from arcface_kernels.backends import triton as triton_backend
from arcface_kernels.backends.triton.configs import CONFIGS
from helpers import assert_matches_reference, make_problem

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the interpreter")


@pytest.fixture(autouse=True)
def production_tiles(monkeypatch):
    monkeypatch.setattr(triton_backend, "tile_config", lambda kernel, interpreted=False: CONFIGS[kernel])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(sub_centers=2, label_smoothing=0.1, m1=1.2, m2=0.3, m3=0.1)],
                         ids=["arcface", "combined"])
def test_triton_production_tiles(dtype, options):
    k = options.get("sub_centers", 1)
    # forward: 4 row blocks of 64 (the last partial), 5 class tiles of 64 in 2 splits, D = 80 in
    # 3 steps of 32 (the last partial); gradient tile: 2 row blocks of 128
    n, c, d = 200, 300, 80
    x, w, y = make_problem(n, c, d, k=k, dtype=dtype, seed=11, ignore=(7,))
    budget = n * 128 * k * 4 + 128 * k * d * 16  # about one 128-class gradient chunk: several chunks
    with ak.workspace_budget(budget):
        assert_matches_reference(x, w, y, "triton", **options)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1)], ids=["arcface", "smoothing"])
def test_a_split_that_holds_only_the_targets(options):
    # 129 classes in 2 splits of 128 (the interpreter's wave of 8 programs, 4 row blocks): the
    # second split holds class 128 alone, so for rows labelled 128 its loop sees no non-target
    # class (a running max of -inf) and their loss is the target term merged after the loop
    x, w, y = make_problem(200, 129, 40, seed=5)
    y[::3] = 128
    assert triton_backend.class_splits(4, 129, CONFIGS["forward"].block_n, 8) == (128, 2)
    assert_matches_reference(x, w, y, "triton", **options)
