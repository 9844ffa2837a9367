"""The one command for a GPU machine, within one deadline (default 480 s):

    python -m bench.gpu [--seconds 480]

Without a CUDA GPU it stops at once with a message and exit status 2, writing nothing. With one,
in this order, every step's time limit cut from what is left of the deadline (less a reserve
for each later step, so that a slow build cannot starve the benchmark):

1. build: the CUDA extension for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from
   torch.cuda.get_device_capability), MAX_JOBS = the number of cores;
2. self-check: `python -m arcface_kernels` (arcface_kernels/selfcheck.py per backend and dtype);
3. headline benchmark at (4096, 262144, 512): ours (bf16) and the insightface-style head in
   fp32 and bf16, with the bf16 matmul rate measured in the same run (bench/gpu_bench.py);
4. headline-shape test: tests/test_gpu_large.py;
5. the GPU suite once per backend (ARCFACE_KERNELS_TEST_BACKENDS), without -x;
6. the other shapes of bench.compare.HEADLINE_SHAPES.

bench/RESULTS.md (device, versions, the measured matmul rate, each step's status, the timings)
is rewritten after every step, so a run cut short still leaves its numbers. Missing test or
build dependencies (pytest, ninja) are installed with pip where the machine can reach an index,
else reported. Commit bench/RESULTS.md afterwards.
"""

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from typing import NamedTuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
MEASUREMENTS = os.path.join(ROOT, "bench", "out", "gpu_bench.jsonl")
HEADLINE = (4096, 262144, 512)
SUITE = ["tests/test_backends.py", "tests/test_no_nxc.py", "tests/test_compile.py", "tests/test_chunk_plan.py"]
BACKENDS = ("cuda", "triton", "torch")
# module -> pip name of what the steps need beyond torch
DEPENDENCIES = {"pytest": "pytest", "ninja": "ninja", "triton": "triton"}
NO_GPU = ("bench.gpu needs a CUDA GPU and torch.cuda.is_available() is False here: nothing was run "
          "or written. Run it on the GPU machine (the CPU test suite is `python -m pytest tests`).")


class Step(NamedTuple):
    name: str
    command: list
    cap: float  # at most this many seconds
    reserve: float  # earlier steps leave at least this many seconds for it
    env: dict = {}


class Deadline:
    """One deadline shared by the steps; clock is injectable for tests."""

    def __init__(self, seconds, clock=time.monotonic):
        self.clock = clock
        self.end = clock() + seconds

    def remaining(self):
        return max(0.0, self.end - self.clock())

    def limit(self, step, later):
        """Seconds step may take: its cap, within what is left after the later steps' reserves."""
        return max(0.0, min(step.cap, self.remaining() - sum(s.reserve for s in later)))


def arch_list(capability):
    """TORCH_CUDA_ARCH_LIST for one GPU: (9, 0) -> "9.0"."""
    return f"{capability[0]}.{capability[1]}"


def build_env(capability, cores):
    return {"ARCFACE_KERNELS_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch_list(capability), "MAX_JOBS": str(cores)}


def steps(capability, cores, python=sys.executable):
    from .compare import HEADLINE_SHAPES  # imports the package: not before the GPU check

    bench = [python, "-m", "bench.gpu_bench", "--out", MEASUREMENTS]
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    other = [",".join(map(str, s)) for s in HEADLINE_SHAPES if s != HEADLINE]
    return [
        Step("build", [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
             240, 60, build_env(capability, cores)),
        Step("self-check", [python, "-m", "arcface_kernels"], 60, 20),
        Step("headline benchmark", bench + ["--matmul", "--shapes", ",".join(map(str, HEADLINE))], 120, 45),
        Step("headline-shape test", pytest + ["tests/test_gpu_large.py"], 90, 20),
        *(Step(f"suite [{b}]", pytest + SUITE, 90, 15, {"ARCFACE_KERNELS_TEST_BACKENDS": b}) for b in BACKENDS),
        Step("other shapes", bench + ["--shapes", *other], 600, 0),
    ]


class Outcome(NamedTuple):
    name: str
    status: str  # "ok", "exit N", "timed out after N s", "skipped: ..."
    seconds: float
    tail: str  # the last non-empty line of its output


def run_step(step, limit):
    """Run one step as a subprocess within limit seconds; its output is echoed."""
    if limit < 5:
        return Outcome(step.name, "skipped: the deadline left no time", 0.0, "")
    print(f"== {step.name} (limit {limit:.0f} s): {' '.join(step.command)}", flush=True)
    start = time.monotonic()
    env = dict(os.environ, **step.env)
    # its own process group, so that a timeout also ends what it started (the build's nvcc jobs)
    proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        status = f"timed out after {limit:.0f} s"
    print(text[-4000:], flush=True)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return Outcome(step.name, status, time.monotonic() - start, lines[-1] if lines else "")


def run_all(plan, deadline, run=run_step, report=lambda outcomes: None):
    """Each step in order within the shared deadline; report(outcomes so far) after every step."""
    outcomes = []
    for i, step in enumerate(plan):
        outcomes.append(run(step, deadline.limit(step, plan[i + 1:])))
        report(outcomes)
    return outcomes


def missing_dependencies(install=True):
    """Modules the steps need that are not importable (after a pip install attempt if install)."""
    missing = [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing and install:
        print(f"== installing missing dependencies: {', '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--timeout", "10", "--retries", "0",
                        *(DEPENDENCIES[m] for m in missing)], timeout=120, check=False)
        importlib.invalidate_caches()
        missing = [name for name in missing if importlib.util.find_spec(name) is None]
    return missing


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment():
    """Report lines on the machine (read before the steps: no package import)."""
    props = torch.cuda.get_device_properties(0)
    cap = torch.cuda.get_device_capability(0)
    return [
        f"device: {props.name} (sm_{cap[0]}{cap[1]}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB), driver CUDA {torch.version.cuda}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
        f"{os.cpu_count()} cores",
    ]


def read_measurements():
    if not os.path.exists(MEASUREMENTS):
        return []
    with open(MEASUREMENTS) as f:
        return [json.loads(line) for line in f if line.strip()]


def _ms(value):
    return "-" if value is None else f"{value:.2f}"


def render(env_lines, deadline_s, outcomes, measurements, missing=()):
    """bench/RESULTS.md from what the run has so far."""
    rates = [m for m in measurements if m["kind"] == "matmul"]
    rate = rates[-1]["tflops"] if rates else None
    measured = f"{rate:.0f} TFLOP/s ({rates[-1]['size']}^3)" if rate else "not measured (the step did not get there)"
    lines = ["# Results: GPU check (`python -m bench.gpu`)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", *(f"- {x}" for x in env_lines),
             f"- bf16 matmul rate measured in this run: {measured}",
             f"- deadline: {deadline_s:.0f} s for all steps"]
    if missing:
        lines.append(f"- missing dependencies (pip could not install them): {', '.join(missing)}")
    lines += ["", "## Steps", "", "| step | status | seconds | last output line |", "| --- | --- | ---: | --- |"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | `{o.tail[:120].replace('|', '/')}` |" for o in outcomes]
    rows = [m for m in measurements if m["kind"] == "timing"]
    lines += ["", "## Timings", "",
              "Medians of CUDA-event timings in this run; bwd = fwd+bwd minus fwd. The floor is 4 x 2NCD "
              "flops at the matmul rate above; fraction = floor / (fwd+bwd).", "",
              "| N x C x D | implementation | inputs | status | fwd ms | bwd ms | fwd+bwd ms | floor ms "
              "| fraction of floor |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        floor = 8.0 * r["n"] * r["c"] * r["d"] / (rate * 1e12) * 1e3 if rate else None
        total = r.get("total_ms")
        bwd = total - r["fwd_ms"] if total is not None and r.get("fwd_ms") is not None else None
        frac = f"{floor / total:.2f}" if floor and total else "-"
        lines.append(f"| {r['n']} x {r['c']} x {r['d']} | {r['impl']} | {r['dtype']} | {r['status']} "
                     f"| {_ms(r.get('fwd_ms'))} | {_ms(bwd)} | {_ms(total)} | {_ms(floor)} | {frac} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=480.0, help="one deadline for every step (default 480)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    deadline = Deadline(args.seconds)
    env_lines = environment()
    missing = missing_dependencies()
    if missing:
        print(f"missing dependencies (pip could not install them): {', '.join(missing)}", file=sys.stderr)
    if os.path.exists(MEASUREMENTS):
        os.remove(MEASUREMENTS)
    os.makedirs(os.path.dirname(MEASUREMENTS), exist_ok=True)

    def report(outcomes):
        with open(RESULTS, "w") as f:
            f.write(render(env_lines, args.seconds, outcomes, read_measurements(), missing))

    plan = steps(torch.cuda.get_device_capability(0), os.cpu_count() or 1)
    outcomes = run_all(plan, deadline, run=run_step, report=report)
    print("\n".join(f"{o.name}: {o.status} ({o.seconds:.0f} s)" for o in outcomes))
    print(f"wrote {os.path.relpath(RESULTS, ROOT)}; commit it")
    return 0 if all(o.status == "ok" for o in outcomes) and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
