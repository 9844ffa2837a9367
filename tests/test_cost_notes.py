"""The predicted-cost table in docs/backends/triton.md is what bench/cost_model.py prints for
the current configs and chunk sizing (a change to either must regenerate the note)."""

import os

from bench import cost_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_note_has_the_model_table():
    with open(os.path.join(ROOT, "docs", "backends", "triton.md")) as f:
        assert cost_model.table() in f.read()


def test_predicted_floor_ratios_do_not_regress():
    # predicted today: 0.596 of the floor at (4096, 262144, 512), 0.50 at D = 128 (the issue asks
    # for 0.60 and 0.45; docs/backends/triton.md says what stops more)
    for (n, c, d), at_least in (((4096, 262144, 512), 0.59), ((4096, 262144, 128), 0.45)):
        plan, _ = cost_model.triton_plan(n, c, d)
        ratio = cost_model.floor_seconds(n, c, d) / cost_model.predict(plan)["total"]
        assert ratio >= at_least, (n, c, d, ratio)
