"""docs/backends/cuda.md's predicted-cost table is the output of bench/cost_model_cuda.py."""

import os

from bench import cost_model_cuda as model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cost_note_table_is_the_model_output():
    with open(os.path.join(ROOT, "docs", "backends", "cuda.md")) as f:
        note = f.read()
    assert model.table() in note


def test_model_counts_the_floor_flops_and_meets_the_bar():
    n, c, d = 4096, 262144, 512
    plan = model.cuda_v2_plan(n, c, d)
    assert sum(k.flops for k in plan) == 4 * 2.0 * n * c * d  # no wasted tensor work
    times = model.predict(plan)
    assert model.floor_seconds(n, c, d) / times["total"] >= 0.40  # the bar for this shape
