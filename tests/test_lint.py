"""The tree passes ruff with the repository's configuration (ruff.toml)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
    try:
        import ruff  # noqa: F401  (the PyPI package ships the binary)
    except ImportError:
        return shutil.which("ruff")
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_passes():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    command = (ruff if isinstance(ruff, list) else [ruff]) + ["check", "--no-cache", ROOT]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
