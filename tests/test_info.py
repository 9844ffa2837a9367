"""`python -m arcface_kernels` reports versions and backends and self-checks the available ones."""

import dataclasses
import subprocess
import sys

import torch

from arcface_kernels.info import self_check


def test_info_command_reports_healthy_torch_backend():
    out = subprocess.run([sys.executable, "-m", "arcface_kernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch     torch.float32   ok" in out.stdout
    assert "all available backends healthy" in out.stdout
    assert "cuda" in out.stdout  # every backend is listed, available or with its reason


def test_self_check_detects_a_wrong_gradient(monkeypatch):
    from arcface_kernels.backends import registry

    good = registry.get_backend("torch")

    def off_by_one_percent(*args):
        dx, dw = good.backward(*args)
        return dx * 1.01, dw

    assert max(self_check("torch", torch.device("cpu"))) < 1e-5
    monkeypatch.setitem(registry._BACKENDS, "torch", dataclasses.replace(good, backward=off_by_one_percent))
    errors = self_check("torch", torch.device("cpu"))
    assert errors[1] > 5e-3 and errors[0] < 1e-5
