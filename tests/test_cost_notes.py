"""docs/backends/triton.md and cuda.md carry what `python -m bench.cost_model` prints for the current
launch plans (a change to the plan or the model must regenerate the notes)."""

import os

import pytest

from bench import cost_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_note_has_the_model_tables(backend):
    with open(os.path.join(ROOT, "docs", "backends", f"{backend}.md")) as f:
        note = f.read()
    assert cost_model.report(backend) in note
    assert "prediction, none is measured" in note
