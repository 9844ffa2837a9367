"""`python -m arcface_kernels` reports versions and backends and self-checks the available ones."""

import subprocess
import sys


def test_info_command_reports_healthy_torch_backend():
    out = subprocess.run([sys.executable, "-m", "arcface_kernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch     torch.float32   ok" in out.stdout
    assert "all available backends healthy" in out.stdout
    assert "cuda" in out.stdout  # every backend is listed, available or with its reason
