"""`python -m arcface_kernels` reports versions and backends and self-checks the available ones."""

import subprocess
import sys


def test_info_command_reports_healthy_torch_backend():
    out = subprocess.run([sys.executable, "-m", "arcface_kernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch     torch.float32   ok" in out.stdout
    assert "all available backends healthy" in out.stdout
    assert "cuda" in out.stdout  # every backend is listed, available or with its reason


def test_info_says_whether_the_cpu_epilogue_is_used(monkeypatch, capsys):
    from arcface_kernels import info
    from arcface_kernels.backends import chunked

    info.main([])
    used = "CPU epilogue extension loaded" in capsys.readouterr().out
    assert used == (chunked._CPU_OPS is not None)
    monkeypatch.setattr(chunked, "_CPU_OPS", None)
    info.main([])
    assert "CPU epilogue extension not in use" in capsys.readouterr().out
