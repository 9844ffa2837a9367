"""The benchmarks run end to end on a CPU: the pytest-benchmark suite in quick mode (its JSON:
every group and member), and the comparison report (--quick: a table row per implementation and
shape, and a PNG)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import bench_peers, compare, peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmark_suite_quick_run_json(tmp_path):
    """`--benchmark-only` (which --benchmark-disable in the ini would refuse), grouped by pass,
    margin and shape; every group holds the library's backends for this device and every peer."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "bench", "--benchmark-only",
                          "--bench-shapes=quick", f"--benchmark-json={out}", "--benchmark-min-rounds=3",
                          "--benchmark-max-time=0.01", "--benchmark-group-by=group"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())["benchmarks"]
    groups = {}
    for b in results:
        groups.setdefault(b["group"], {})[b["extra_info"]["member"]] = b["stats"]
    (n, c, d), = bench_peers.SHAPES["quick"]
    expected = {f"{p} {m} {n}x{c}x{d}" for p in ("forward", "backward") for m in bench_peers.BENCH_MARGINS}
    assert set(groups) == expected, sorted(groups)
    for group, members in groups.items():
        margin = group.split()[1]
        wanted = {name for name, impl in bench_peers.members(margin).items() if not isinstance(impl, str)}
        assert set(members) == wanted, (group, sorted(members))
        assert {"arcface_kernels[torch]", "eager reference", "insightface-style (fp32)", "insightface-style (bf16)",
                "pml-style", "torch.compile(reference)"} <= wanted
        if margin == "softmax" and hasattr(torch.nn.functional, "linear_cross_entropy"):
            assert {"F.linear_cross_entropy", "F.linear_cross_entropy chunked (auto)"} <= wanted
        for stats in members.values():
            assert stats["rounds"] >= 3 and 0 < stats["min"] <= stats["median"] <= stats["max"], stats


@pytest.mark.slow
def test_quick_report_has_a_row_per_implementation(tmp_path):
    rows = compare.main(["--quick", "--margin", "softmax", "--out", str(tmp_path), "--iters", "2", "--repeats", "2"])
    report = (tmp_path / "report.md").read_text()
    names = [name for name, _ in peers.implementations(compare.torch.device("cpu"), plain_softmax=True)]
    assert "cut-cross-entropy" in names and "liger-kernel FLCE" in names and "F.linear_cross_entropy" in names
    table_rows = [line for line in report.splitlines() if re.match(r"\| \d+ x \d+ x \d+ \|", line)]
    assert len(table_rows) == len(names) * len(compare.QUICK_SHAPES) == len(rows)
    for name in names:
        assert sum(f"| {name} |" in line for line in table_rows) == len(compare.QUICK_SHAPES)
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in measured} >= {"eager reference", "torch.compile(reference)", "arcface_kernels[torch]",
                                             "insightface-style (fp32)", "insightface-style (bf16)"}
    for r in measured:
        # no margin: every head computes the same function (bf16 logits to bf16 precision)
        assert r["error"] < (5e-2 if "bf16" in r["impl"] else 1e-3), r
        assert 0 < r["fwd"]["median"] <= r["total"]["median"] and r["bwd"]["median"] <= r["total"]["median"], r
        assert r["total"]["low"] <= r["total"]["median"] <= r["total"]["high"], r
        assert all(v >= 0 for v in r["memory"].values()) and r["memory"]["total"] > 0, r
    line = next(line for line in table_rows if "| eager reference |" in line)
    # every time with its spread, and its peak extra memory beside it
    assert re.search(r"\| \d+\.\d{3} \+- \d+\.\d{3} \| \d+\.\d{2} \| \d+\.\d{3} \+- \d+\.\d{3} \| \d+\.\d{2} \| "
                     r"\d+\.\d{3} \+- \d+\.\d{3} \| \d+\.\d{2} \|", line), line
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_a_speedup_within_the_spread_is_flagged_not_reported():
    def row(impl, low, median, high):
        return dict(impl=impl, n=1, c=2, d=3, status="ok", total=dict(low=low, median=median, high=high))

    rows = [row("base", 9.0, 10.0, 11.0), row("overlapping", 4.0, 5.0, 9.5), row("faster", 4.0, 5.0, 6.0),
            row("slower", 12.0, 20.0, 25.0), dict(impl="absent", n=1, c=2, d=3, status="not installed")]
    compare._speedups(rows, ("base", "missing baseline"))
    assert [r["speedups"] for r in rows] == [["~", None], ["~", None], [2.0, None], [0.5, None], [None, None]]


def test_shape_argument_is_checked():
    import argparse

    import pytest

    assert compare.parse_shape("4,5,6") == (4, 5, 6)
    with pytest.raises(argparse.ArgumentTypeError):
        compare.parse_shape("4,5")
