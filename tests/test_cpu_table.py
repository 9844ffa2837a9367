"""bench/cpu_table.py at tiny shapes: every implementation timed or said why not, the ratios
against the floor and ours, the best batch chunk among the candidates, and the computed memory
of the peers at a class count they are not run at."""

import pytest
import torch

from bench import cpu_table
from helpers import CountingOps


def test_table_at_a_tiny_shape_has_every_implementation():
    n, c, d = 16, 40, 8
    times, peaks, grads, skipped = cpu_table.measure(n, c, d, torch.float32, repeats=1, with_compile=False)
    names = set(times) | set(skipped)
    assert {"ours", "ours m=0", cpu_table.FLOOR, "plain head (normalize + cross_entropy)", "insightface head",
            "pml head"} <= set(times)
    if cpu_table.HAS_LCE:
        best = [k for k in times if "best of" in k]
        assert len(best) == 1 and best[0].endswith("best of 16)"), best  # every candidate capped at N = 16
        assert {"F.linear_cross_entropy", "F.linear_cross_entropy chunked (auto)"} <= set(times)
    assert all(t > 0 and t_cpu >= 0 for t, t_cpu in times.values())
    assert set(peaks) == set(times) - {cpu_table.FLOOR}
    assert peaks["ours"][0] >= grads == (n + c) * d * 4  # the gradients are counted
    text = cpu_table.table(n, c, d, torch.float32, (times, peaks, grads, skipped))
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| implementation")
            and not line.startswith("| ---")]
    assert len(rows) == len(names)
    assert f"| {cpu_table.FLOOR} | {times[cpu_table.FLOOR][0] * 1e3:,.1f} | 1.00 |" in text
    assert "| ours | " in text and " | 1.00 | " in next(r for r in rows if r.startswith("| ours |"))


def test_auto_chunking_is_refused_where_it_would_take_minutes():
    impls = cpu_table.implementations(256, 10_000_000, 128, with_compile=False)
    if not cpu_table.HAS_LCE:
        pytest.skip("no F.linear_cross_entropy in this torch")
    assert isinstance(impls["F.linear_cross_entropy chunked (auto)"], str)
    assert callable(cpu_table.implementations(64, 8, 2, with_compile=False)["F.linear_cross_entropy chunked (auto)"])


def test_peer_memory_is_extrapolated_linearly_in_classes():
    # measured at 60 and 120 classes, predicted at 300; the materializing heads hold N x C buffers
    n, d = 32, 8
    predicted = cpu_table.peer_memory_at(n, 300, d, torch.float32, probe_classes=(60, 120))
    measured = cpu_table.peer_memory_at(n, 300, d, torch.float32, probe_classes=(300, 600))
    assert "plain head (normalize + cross_entropy)" in predicted
    for name, nbytes in predicted.items():
        assert nbytes == pytest.approx(measured[name], rel=0.02), name
        assert nbytes > 2 * n * 300 * 4, name  # at least the logits and their gradient


def test_main_appends_the_table(tmp_path):
    out = tmp_path / "table.md"
    assert cpu_table.main(["--shapes", "8,20,4", "--repeats", "1", "--no-compile", "--only", "ours",
                           "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("Machine: ") and "### (N, C, D) = (8, 20, 4), float32" in text
    assert "| ours | " in text and f"| {cpu_table.FLOOR} | " in text and "10,000,000" not in text


@pytest.mark.skipif(not cpu_table.chunked.bf16_gemm(torch.bfloat16), reason="no bf16_gemm here")
def test_bfloat16_floor_runs_the_gemms_ours_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops, "arcface_kernels_cpu", CountingOps(calls))
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(30, 8).bfloat16()
    monkeypatch.setattr(cpu_table, "CPU_TILE_BYTES", 4 * 4 * 10)  # chunks of 10 float32 columns
    cpu_table.floor_step(x, w, float32_out=True)()
    assert calls == ["bf16_gemm"] * 12  # four per chunk, three chunks
