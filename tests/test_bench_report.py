"""The comparison report runs end to end on a CPU (--quick): a table row per implementation
and shape, and a PNG."""

import re

import pytest

from bench import compare, peers


@pytest.mark.slow
def test_quick_report_has_a_row_per_implementation(tmp_path):
    rows = compare.main(["--quick", "--margin", "softmax", "--out", str(tmp_path), "--iters", "1"])
    report = (tmp_path / "report.md").read_text()
    names = [name for name, _ in peers.implementations(compare.torch.device("cpu"), plain_softmax=True)]
    assert "cut-cross-entropy" in names and "liger-kernel FLCE" in names
    table_rows = [line for line in report.splitlines() if re.match(r"\| \d+ x \d+ x \d+ \|", line)]
    assert len(table_rows) == len(names) * len(compare.QUICK_SHAPES) == len(rows)
    for name in names:
        assert sum(f"| {name} |" in line for line in table_rows) == len(compare.QUICK_SHAPES)
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in measured} >= {"eager reference", "torch.compile(reference)", "arcface_kernels[torch]"}
    for r in measured:
        assert r["total"] > 0 and r["error"] < 1e-3  # no margin: every head computes the same function
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_shape_argument_is_checked():
    import argparse

    import pytest

    assert compare.parse_shape("4,5,6") == (4, 5, 6)
    with pytest.raises(argparse.ArgumentTypeError):
        compare.parse_shape("4,5")
