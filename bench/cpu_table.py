"""The CPU table: the `torch` backend against the four matmuls it cannot avoid and against what a
CPU user would otherwise run, forward + backward, float32 (docs/backends/torch.md).

    python -m bench.cpu_table                      # every shape, writes nothing
    python -m bench.cpu_table --shapes 64,8,2 --out bench/CPU_RESULTS.md
    THP_MEM_ALLOC_ENABLE=1 python -m bench.cpu_table ...   # transparent huge pages in torch's CPU allocator

Implementations, each timed as forward + backward from leaf tensors (gradients zeroed between
calls, not timed), interleaved over the repeats so that the machine's drift hits all alike,
medians reported:

- ours: ArcFace (s = 64, m2 = 0.5) on the `torch` backend, raw inputs (the op normalizes).
- ours m=0: the same at m2 = 0 (plain normalized softmax), for the cross-entropy peers.
- floor: the four chunked matmuls of a head that never stores N x C (X W_c^T, its recompute,
  G W_c, G^T X; docs/design.md eq. (25)), measured in the same run, in chunks of the tile size
  the `torch` backend uses on a CPU (common.CPU_TILE_BYTES): smaller chunks make the floor itself
  slower on a loaded 2-core machine.
- F.linear_cross_entropy: torch's own fused linear + cross-entropy on pre-normalized inputs
  (s x^ and w^, normalization not timed: flattering it), default path (materializes N x C) and
  chunked path (LinearCrossEntropyOptions() and batch_chunk_size=512).
- plain head: F.normalize + F.linear + F.cross_entropy (no margin).
- insightface head: bench.peers.insightface_style (materializing, margin without autograd).
- compiled reference (--compile): torch.compile of the reference backend (slow to compile).

Peak extra memory: the most bytes of tensors allocated and alive at once during one forward +
backward (inputs excluded, gradients included), seen by a dispatch mode in a separate untimed call.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import arcface_kernels as ak
from arcface_kernels.backends.common import CPU_TILE_BYTES

from .live_bytes import LiveBytes
from .peers import insightface_style

SHAPES = ((256, 100_000, 512), (256, 1_000_000, 128), (1024, 100_000, 128), (64, 8, 2))
SPEC = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)


def floor_step(n, c, d, dtype):
    """The four (N x chunk) matmuls per class chunk, on preallocated buffers."""
    chunk = max(1, min(c, CPU_TILE_BYTES // (n * 4)))
    x = torch.randn(n, d, dtype=dtype)
    w = torch.randn(c, d, dtype=dtype)
    tile = torch.empty(n, min(chunk, c), dtype=dtype)
    b = torch.zeros(n, d, dtype=dtype)
    a = torch.empty(min(chunk, c), d, dtype=dtype)

    def run():
        for start in range(0, c, chunk):
            wc = w[start : start + chunk]
            t = tile[:, : wc.shape[0]]
            torch.mm(x, wc.T, out=t)       # forward
            torch.mm(x, wc.T, out=t)       # recompute in backward
            b.addmm_(t, wc)                # G W_c
            torch.mm(t.T, x, out=a[: wc.shape[0]])  # G^T X

    return run


def implementations(with_compile):
    def ours(m2):
        def loss(x, w, y):
            return ak.margin_softmax_loss(x, w, y, scale=SPEC["scale"], m1=1.0, m2=m2, m3=0.0, backend="torch")
        return loss

    def normalized(loss):
        # pre-normalized inputs, as a plain cross-entropy peer takes them (normalization not timed)
        loss.prenormalized = True
        return loss

    def lce(options):
        return normalized(lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options))

    impls = {
        "ours": ours(0.5),
        "ours m=0": ours(0.0),
        "F.linear_cross_entropy": lce(None),
        "F.linear_cross_entropy chunked (auto)": lce(torch.nn.LinearCrossEntropyOptions()),
        "F.linear_cross_entropy chunked (batch_chunk_size=512)": lce(
            torch.nn.LinearCrossEntropyOptions(batch_chunk_size=512)),
        "plain head (normalize + cross_entropy)": lambda x, w, y: F.cross_entropy(
            SPEC["scale"] * F.linear(F.normalize(x), F.normalize(w)), y),
        "insightface head": lambda x, w, y: insightface_style(x, w, y, SPEC),
    }
    if with_compile:
        impls["torch.compile(reference)"] = torch.compile(
            lambda x, w, y: ak.margin_softmax_loss(x, w, y, **SPEC, backend="reference"))
    return impls


def _inputs(n, c, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    xn = (SPEC["scale"] * F.normalize(x.float())).to(dtype)
    wn = F.normalize(w.float()).to(dtype)
    return {False: (x.requires_grad_(), w.requires_grad_()), True: (xn.requires_grad_(), wn.requires_grad_())}, y


def _step(fn, leaves, y):
    x, w = leaves
    x.grad = w.grad = None
    fn(x, w, y).backward()


def measure(n, c, d, dtype, repeats, with_compile, names=None):
    leaves, y = _inputs(n, c, d, dtype)
    impls = implementations(with_compile)
    if names:
        impls = {k: v for k, v in impls.items() if k in names}
    calls = {name: (lambda f=f: _step(f, leaves[getattr(f, "prenormalized", False)], y)) for name, f in impls.items()}
    calls["floor (4 matmuls)"] = floor_step(n, c, d, dtype)
    times = {name: [] for name in calls}
    errors = {}
    for name, call in list(calls.items()):  # warm-up (compiles), and drop what cannot run
        try:
            call()
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e)[:120]}"
            del calls[name], times[name]
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name, call in calls.items():
        if name.startswith("floor"):
            continue
        with LiveBytes() as probe:
            call()
        peaks[name] = probe.peak
    grads = (n + c) * d * torch.tensor([], dtype=dtype).element_size()
    return {name: statistics.median(v) for name, v in times.items()}, peaks, grads, errors


def _machine():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}, "
            f"load average {load:.1f}; commit {commit}{' (dirty)' if dirty else ''}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def table(n, c, d, dtype, result):
    times, peaks, grads, errors = result
    floor = times.get("floor (4 matmuls)")
    ours = times.get("ours")
    lines = [f"### (N, C, D) = ({n}, {c:,}, {d}), {str(dtype).replace('torch.', '')}", "",
             "| implementation | fwd+bwd ms | / floor | / ours | peak extra MiB (grads incl.) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, t in times.items():
        peak = f"{peaks[name] / 2**20:.1f}" if name in peaks else "-"
        ratio_floor = f"{t / floor:.2f}" if floor else "-"
        ratio_ours = f"{t / ours:.2f}" if ours else "-"
        lines.append(f"| {name} | {t * 1e3:.1f} | {ratio_floor} | {ratio_ours} | {peak} |")
    for name, e in errors.items():
        lines.append(f"| {name} | failed: {e} | | | |")
    lines += ["", f"Gradients: {grads / 2**20:.1f} MiB.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", help="N,C,D triples (default: the four of the table)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="implementation names to run (the floor always runs)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile(reference) (slow to compile)")
    parser.add_argument("--out", help="append the table to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    text = [f"Machine: {_machine()}. Medians of {args.repeats} interleaved repeats.", ""]
    print(text[0], flush=True)
    for n, c, d in shapes:
        block = table(n, c, d, dtype, measure(n, c, d, dtype, args.repeats, args.compile, args.only))
        print(block, flush=True)
        text.append(block)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
