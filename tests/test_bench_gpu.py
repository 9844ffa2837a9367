"""`python -m bench.gpu` without a GPU, and its deadline, step order, arch selection and results
file with the steps stubbed (the real steps need a GPU)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_state():
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    with open(gpu.RESULTS, "rb") as f:
        return status, f.read()


def test_without_a_gpu_it_stops_at_once_and_writes_nothing():
    before = _git_state()
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert time.monotonic() - start < 60
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "nothing was run or written" in out.stderr
    assert _git_state() == before


@pytest.mark.parametrize("capability,archs", [((9, 0), "9.0"), ((8, 6), "8.6"), ((10, 0), "10.0"), ((7, 5), "7.5")])
def test_builds_only_the_present_gpus_arch_with_every_core(capability, archs):
    build = gpu.steps(capability, 16)[0]
    assert build.name == "build"
    assert build.env["TORCH_CUDA_ARCH_LIST"] == archs
    assert build.env["MAX_JOBS"] == "16"
    assert build.env["ARCFACE_KERNELS_BUILD_CUDA"] == "1"


def test_step_order_and_suite_without_x():
    plan = gpu.steps((9, 0), 4)
    assert [s.name for s in plan] == ["build", "self-check", "headline benchmark", "headline-shape test",
                                      "suite [cuda]", "suite [triton]", "suite [torch]", "other shapes"]
    for step in plan[4:7]:
        assert "-x" not in step.command
        assert step.env["ARCFACE_KERNELS_TEST_BACKENDS"] == step.name[7:-1]
    assert "4096,262144,512" in plan[2].command and "--matmul" in plan[2].command
    assert "4096,262144,512" not in plan[-1].command


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _stub_plan():
    return [gpu.Step("a", [], cap=100, reserve=10), gpu.Step("b", [], cap=50, reserve=30),
            gpu.Step("c", [], cap=1000, reserve=20)]


def test_one_deadline_shared_by_the_steps():
    clock = FakeClock()
    deadline = gpu.Deadline(120, clock)
    limits = []

    def run(step, limit):  # every step uses all the time it is given (a timeout)
        limits.append(limit)
        clock.now += limit
        return gpu.Outcome(step.name, "timed out", limit, "")

    gpu.run_all(_stub_plan(), deadline, run=run)
    # a: its cap is 100 but b and c need their reserves (30 + 20): 70; b: min(50, 50 - 20); c: the rest
    assert limits == [70, 30, 20]
    assert clock.now == 120


def test_fast_steps_leave_their_time_to_later_ones_and_late_steps_are_skipped():
    clock = FakeClock()
    deadline = gpu.Deadline(120, clock)
    limits = []

    def run(step, limit):
        limits.append(limit)
        clock.now += 5 if step.name == "a" else 0
        return gpu.Outcome(step.name, "ok", 0, "")

    gpu.run_all(_stub_plan(), deadline, run=run)
    assert limits == [70, 50, 115]
    # with nothing left, run_step skips without starting the command
    assert gpu.run_step(gpu.Step("late", ["false"], 10, 0), 0).status.startswith("skipped")


def test_a_step_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    marker = tmp_path / "child-finished"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(8)\nopen({str(marker)!r}, 'w').close()\n")
    step = tmp_path / "step.py"  # starts a child that would outlive it, then waits
    step.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(child)!r}])\n"
                    "print('started', flush=True)\ntime.sleep(60)\n")
    start = time.monotonic()
    outcome = gpu.run_step(gpu.Step("slow", [sys.executable, str(step)], 60, 0), 6)
    assert outcome.status == "timed out after 6 s" and outcome.tail == "started"
    assert time.monotonic() - start < 30
    time.sleep(max(0.0, start + 12 - time.monotonic()))  # past the child's 8 s
    assert not marker.exists()


def test_results_are_rewritten_after_every_step(tmp_path, monkeypatch):
    results, measurements = tmp_path / "RESULTS.md", tmp_path / "m.jsonl"
    monkeypatch.setattr(gpu, "RESULTS", str(results))
    monkeypatch.setattr(gpu, "MEASUREMENTS", str(measurements))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gpu, "environment", lambda: ["device: fake H100"])
    monkeypatch.setattr(gpu, "missing_dependencies", lambda: [])
    seen = []

    def run(step, limit):
        # what the file says when this step starts: every earlier step, none of the later ones
        seen.append(results.read_text() if results.exists() else "")
        if step.name == "headline benchmark":
            with open(measurements, "a") as f:
                f.write(json.dumps(dict(kind="matmul", size=8192, tflops=800.0)) + "\n")
                f.write(json.dumps(dict(kind="timing", impl="arcface_kernels[triton]", dtype="bf16", n=4096,
                                        c=262144, d=512, status="ok", fwd_ms=5.0, total_ms=20.0)) + "\n")
        return gpu.Outcome(step.name, "ok" if step.name != "suite [torch]" else "exit 1", 1.0, "1 passed")

    monkeypatch.setattr(gpu, "run_step", run)
    assert gpu.main(["--seconds", "100"]) == 1  # one step failed
    names = [s.name for s in gpu.steps((9, 0), 1)]
    assert seen[0] == ""
    for i in range(1, len(names)):
        assert f"| {names[i - 1]} | " in seen[i] and f"| {names[i]} | " not in seen[i]
    final = results.read_text()
    assert "device: fake H100" in final and "800 TFLOP/s" in final
    assert "| suite [torch] | exit 1 |" in final
    # floor = 8 N C D / 800 TFLOP/s = 5.50 ms; fraction = 5.50 / 20
    assert "| 4096 x 262144 x 512 | arcface_kernels[triton] | bf16 | ok | 5.00 | 15.00 | 20.00 | 5.50 | 0.27 |" in final


def test_missing_dependencies_are_installed_or_reported(monkeypatch):
    installed = set()
    commands = []

    def find_spec(name):
        return object() if name not in ("ninja", "pytest") or name in installed else None

    def pip(command, **kwargs):
        commands.append(command)
        installed.add("pytest")  # pip gets pytest, not ninja (no index for it, say)

    monkeypatch.setattr(gpu.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(gpu.subprocess, "run", pip)
    assert gpu.missing_dependencies() == ["ninja"]
    assert commands[0][-2:] == ["pytest", "ninja"]
    assert "missing dependencies (pip could not install them): ninja" in gpu.render([], 480, [], [], ["ninja"])
