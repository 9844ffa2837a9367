"""The one command for a GPU machine (ten minutes or less):

    python -m bench.gpu

1. builds the package with the CUDA extension for the installed torch (pip, no build isolation),
2. prints the environment report and each backend's self-check (`python -m arcface_kernels`),
3. runs the GPU test suite on every backend, bf16 included (tests/test_backends.py,
   tests/test_gpu_large.py with N = 4096, C = 262144, the no-N x C probe, torch.compile),
4. benchmarks the headline shapes against the peers (`python -m bench.compare --write-results`:
   the insightface-style bf16 head as the main eager peer, the floor at the bf16 matmul rate
   measured in the same run), which writes bench/RESULTS.md,
5. appends the test summary and the versions to bench/RESULTS.md.

Each step has its own time limit; a failed step is reported and the others still run. Commit
bench/RESULTS.md afterwards.
"""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
GPU_TESTS = ["tests/test_backends.py", "tests/test_gpu_large.py", "tests/test_no_nxc.py", "tests/test_compile.py",
             "tests/test_chunk_plan.py"]
# (name, command, seconds)
STEPS = [
    ("build", [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], 240),
    ("self-check", [sys.executable, "-m", "arcface_kernels"], 60),
    ("GPU tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GPU_TESTS], 150),
    ("benchmark", [sys.executable, "-m", "bench.compare", "--write-results", "--iters", "5"], 300),
]


def run(name, command, seconds):
    start = time.time()
    print(f"== {name}: {' '.join(command)}", flush=True)
    env = dict(os.environ, ARCFACE_KERNELS_BUILD_CUDA="1") if name == "build" else None
    try:
        out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds)
        status, text = ("ok" if out.returncode == 0 else f"exit {out.returncode}"), out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        status, text = f"timed out after {seconds} s", (err.stdout or b"").decode(errors="replace")
    print(text[-4000:], flush=True)
    print(f"== {name}: {status} in {time.time() - start:.0f} s", flush=True)
    return status, text


def main():
    report = []
    for name, command, seconds in STEPS:
        status, text = run(name, command, seconds)
        tail = [line for line in text.strip().splitlines() if line.strip()][-3:]
        report.append(f"- {name}: {status}" + (f" (`{tail[-1].strip()}`)" if tail else ""))
    with open(RESULTS, "a") as f:
        f.write("\n## GPU check (`python -m bench.gpu`)\n\n" + "\n".join(report) + "\n")
    print("\n".join(report))
    return 0 if all(line.split(": ", 1)[1].startswith("ok") for line in report) else 1


if __name__ == "__main__":
    sys.exit(main())
