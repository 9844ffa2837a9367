"""The shared backend suite on the triton backend, run on the CPU by Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so the suite runs in a child pytest
with the variable set; there conftest.py's BACKENDS includes "triton" (bf16 is skipped: the
interpreter's bf16 dot is wrong, so bf16 is checked on a GPU).
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite runs the compiled kernels directly")
def test_backend_suite_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests = [os.path.join(TESTS, name) for name in ("test_backends.py", "test_entry_paths.py", "test_no_nxc.py",
                                                  "test_work_count.py", "test_gradient_rules.py",
                                                  "test_triton_production_tiles.py", "test_margin_family.py",
                                                  "test_margin_heads.py", "test_nontarget.py",
                                                  "test_nontarget_heads.py")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
           "-W", "error::RuntimeWarning", *tests]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
