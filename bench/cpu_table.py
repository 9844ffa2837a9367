"""The CPU table: the `torch` backend against the four matmuls of a head that never stores N x C
and against what a CPU user would otherwise run, forward + backward (docs/backends/torch.md;
issue 21's table).

    python -m bench.cpu_table --quick                       # a smoke run: two small shapes, seconds
    python -m bench.cpu_table                               # every shape of the table, and C = 10M
    python -m bench.cpu_table --shapes 64,8,2 --threads 1 --repeats 300 --out bench/CPU_RESULTS.md
    python -m bench.cpu_table --thp both                    # the whole run twice, THP_MEM_ALLOC_ENABLE=0 and 1
    python -m bench.cpu_table --huge-only                   # only the C = 10,000,000 entry

Pieces for a time budget: one shape per --shapes run, --repeats 1-3, --no-compile, --no-huge,
--only NAME ... (the floor always runs). A whole run was not timed on the 2-core machine.

Implementations, each timed as forward + backward from leaf tensors (gradients zeroed between
calls, not timed), interleaved over the repeats so that the machine's drift hits all alike,
medians reported, of wall time and of the process's CPU time (on a loaded machine a small call's
wall time is mostly waiting to be scheduled):

- ours: ArcFace (s = 64, m2 = 0.5) on the `torch` backend, raw inputs (the op normalizes).
- ours m=0: the same at m2 = 0 (plain normalized softmax), what the cross-entropy peers compute.
- floor: the four chunked matmuls of a head that never stores N x C (X W_c^T, its recompute,
  G W_c, G^T X; docs/design.md eq. (25)) on the same inputs, in chunks of the tile the `torch`
  backend uses on a CPU (common.CPU_TILE_BYTES). Where the backend makes a "mean" loss's
  gradients in forward (backends/row_blocks.py) it does three of them: ours may be below 1. For
  bfloat16 inputs, where the backend runs bf16_gemm (float32 accumulation and output), the same
  four bf16_gemm calls: a bfloat16 torch.mm (bfloat16 out) is slower here (AVX2: 14 GFLOP/s,
  67-83 s per step at (256, 100k, 512)) and not what a float32-accurate head can use.
- F.linear_cross_entropy (torch >= 2.14): torch's own fused linear + cross-entropy on
  pre-normalized inputs (s x^ and w^; normalization not timed, which flatters it): its default
  path (materializes N x C); its chunked path with automatic options (8-row batch chunks, each a
  pass over the whole weight: run only where that is under AUTO_CHUNK_PASS_LIMIT bytes of weight
  traffic, it takes minutes beyond); and its chunked path at the best batch_chunk_size of
  BATCH_CHUNK_SIZES, chosen by one timed call each before the interleaved repeats.
- the eager heads: plain (F.normalize + F.linear + F.cross_entropy, no margin), insightface-style
  and pytorch-metric-learning-style ArcFace (bench.peers).
- torch.compile(reference): the reference backend's ArcFace compiled (--no-compile skips it: its
  compile takes tens of seconds per shape on 2 cores).

Peak extra memory: the most bytes of tensors allocated and alive at once during one forward +
backward (inputs excluded, gradients included), seen by bench.live_bytes.LiveBytes in the untimed
warm-up call (for the compiled head, in a call after it compiled). It does not see inside a single
ATen op that allocates internally (F.linear_cross_entropy's chunked path): those rows are marked
as lower bounds.

The C = 10,000,000, D = 128, N = 256 entry runs ours and the floor only; what the materializing
peers would need is computed, not run: their peak extra memory measured at two small class
counts with the same N and D, extrapolated linearly in C (their N x C buffers grow with C).
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import arcface_kernels as ak
from arcface_kernels.backends import chunked
from arcface_kernels.backends.common import CPU_TILE_BYTES

from .live_bytes import LiveBytes
from .peers import insightface_style, pml_style

SHAPES = ((256, 100_000, 512), (256, 1_000_000, 128), (1024, 100_000, 128), (4096, 100_000, 128), (64, 8, 2))
QUICK_SHAPES = ((64, 8, 2), (256, 2_000, 64))
HUGE = (256, 10_000_000, 128)
# the peers' memory at HUGE is extrapolated from these class counts (same N and D)
HUGE_PROBE_CLASSES = (20_000, 40_000)
BATCH_CHUNK_SIZES = (128, 256, 512, 1024)
# F.linear_cross_entropy's automatic chunking reads the whole weight per 8-row chunk
AUTO_CHUNK_ROWS = 8
AUTO_CHUNK_PASS_LIMIT = 4 * 2**30
SPEC = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
FLOOR = "floor (4 matmuls)"
HAS_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def floor_step(x, w, float32_out=False):
    """The four (N x chunk) matmuls per class chunk of x (N, D) and w (C, D), on preallocated
    buffers. float32_out (bfloat16 inputs): as the `torch` backend runs them on bfloat16 operands,
    float32 accumulation and output (bf16_gemm, csrc/cpu_bf16_gemm.cpp), the G tile in bfloat16;
    else torch.mm in the inputs' dtype (bfloat16 out for bfloat16 in)."""
    x, w = x.detach(), w.detach()
    (n, d), c = x.shape, w.shape[0]
    out_dtype = torch.float32 if float32_out else x.dtype
    chunk = max(1, min(c, CPU_TILE_BYTES // (n * torch.tensor([], dtype=out_dtype).element_size())))
    tile = torch.empty(n, chunk, dtype=out_dtype)
    g = torch.randn(n, chunk).to(x.dtype)  # the backward's G tile (its values do not change the time)
    b = torch.zeros(n, d, dtype=out_dtype)
    a = torch.empty(chunk, d, dtype=out_dtype)
    ops = torch.ops.arcface_kernels_cpu

    def run():
        for start in range(0, c, chunk):
            wc = w[start : start + chunk]
            t, gc, ac = tile[:, : wc.shape[0]], g[:, : wc.shape[0]], a[: wc.shape[0]]
            if float32_out:
                ops.bf16_gemm(t, x, wc.T)      # forward
                ops.bf16_gemm(t, x, wc.T)      # recompute in backward
                ops.bf16_gemm(b, gc, wc, 1.0)  # B += G W_c
                ops.bf16_gemm(ac, gc.T, x)     # A_c = G^T X
            else:
                torch.mm(x, wc.T, out=t)
                torch.mm(x, wc.T, out=t)
                b.addmm_(gc, wc)
                torch.mm(gc.T, x, out=ac)

    return run


def _ours(m2):
    def loss(x, w, y):
        return ak.margin_softmax_loss(x, w, y, scale=SPEC["scale"], m1=1.0, m2=m2, m3=0.0, backend="torch")
    return loss


def _normalized(loss):
    # pre-normalized inputs, as a plain cross-entropy peer takes them (normalization not timed)
    loss.prenormalized = True
    return loss


def _lce(**chunking):
    options = torch.nn.LinearCrossEntropyOptions(**chunking) if chunking else None
    loss = _normalized(lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options))
    loss.opaque = bool(chunking)  # allocates inside one op: LiveBytes sees a lower bound
    return loss


def implementations(n, c, d, with_compile=True):
    """name -> loss(x, w, y) at this shape; a string instead of a function says why it is not run."""
    impls = {"ours": _ours(0.5), "ours m=0": _ours(0.0)}
    if HAS_LCE:
        impls["F.linear_cross_entropy"] = _lce()
        passes = -(-n // AUTO_CHUNK_ROWS) * c * d * 4
        impls["F.linear_cross_entropy chunked (auto)"] = (
            _lce(batch_chunk_size=None) if passes <= AUTO_CHUNK_PASS_LIMIT else
            f"not run: {n // AUTO_CHUNK_ROWS} passes over the weight ({passes / 2**30:.0f} GiB of reads)")
        impls["F.linear_cross_entropy chunked (best batch_chunk_size)"] = None  # chosen in measure()
    else:
        impls["F.linear_cross_entropy"] = f"not in torch {torch.__version__}"
    impls["plain head (normalize + cross_entropy)"] = lambda x, w, y: F.cross_entropy(
        SPEC["scale"] * F.linear(F.normalize(x), F.normalize(w)), y)
    impls["insightface head"] = lambda x, w, y: insightface_style(x, w, y, SPEC)
    impls["pml head"] = lambda x, w, y: pml_style(x, w, y, SPEC)
    if with_compile:
        compiled = torch.compile(lambda x, w, y: ak.margin_softmax_loss(x, w, y, **SPEC, backend="reference"))
        impls["torch.compile(reference)"] = lambda x, w, y: compiled(x, w, y)
        impls["torch.compile(reference)"].compiled = True  # its memory is probed after it compiled
    return impls


def _inputs(n, c, d, dtype, prenormalized, seed=0):
    """{False: raw leaves, True: pre-normalized leaves (only if asked)}, labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    leaves = {False: (x.requires_grad_(), w.requires_grad_())}
    if prenormalized:
        leaves[True] = ((SPEC["scale"] * F.normalize(x.detach().float())).to(dtype).requires_grad_(),
                        F.normalize(w.detach().float()).to(dtype).requires_grad_())
    return leaves, y


def _step(fn, leaves, y):
    x, w = leaves
    x.grad = w.grad = None
    fn(x, w, y).backward()


def _peak(call):
    with LiveBytes() as probe:
        call()
    return probe.peak


def _best_batch_chunk(leaves, y, sizes):
    """The fastest of `sizes` for F.linear_cross_entropy's chunked path, by one timed call each
    after a warm-up call."""
    times = {}
    for size in sizes:
        loss = _lce(batch_chunk_size=size)
        _step(loss, leaves, y)
        start = time.perf_counter()
        _step(loss, leaves, y)
        times[size] = time.perf_counter() - start
    return min(times, key=times.get)


def measure(n, c, d, dtype, repeats, with_compile=True, names=None):
    """Medians, peaks, the gradients' bytes, and per implementation not run: why."""
    impls = implementations(n, c, d, with_compile)
    if names:
        impls = {k: v for k, v in impls.items() if k in names}
    skipped = {name: why for name, why in impls.items() if isinstance(why, str)}
    impls = {name: f for name, f in impls.items() if name not in skipped}
    leaves, y = _inputs(n, c, d, dtype, prenormalized=any(f is None or hasattr(f, "prenormalized")
                                                           for f in impls.values()))
    best = "F.linear_cross_entropy chunked (best batch_chunk_size)"
    if best in impls:
        sizes = sorted({min(s, n) for s in BATCH_CHUNK_SIZES})
        size = _best_batch_chunk(leaves[True], y, sizes)
        name = f"F.linear_cross_entropy chunked (batch_chunk_size={size}, best of {', '.join(map(str, sizes))})"
        impls = {name if k == best else k: _lce(batch_chunk_size=size) if k == best else f for k, f in impls.items()}
    calls = {name: (lambda f=f: _step(f, leaves[getattr(f, "prenormalized", False)], y)) for name, f in impls.items()}
    calls[FLOOR] = floor_step(*leaves[False], float32_out=chunked.bf16_gemm(dtype))
    compiled = {name for name, f in impls.items() if getattr(f, "compiled", False)}
    peaks = {}
    for name, call in list(calls.items()):  # warm-up (compiles), and drop what cannot run
        try:  # an eager call's warm-up is its memory probe too: one call fewer per implementation
            if name == FLOOR or name in compiled:
                call()
            else:
                peaks[name] = (_peak(call), getattr(impls[name], "opaque", False))
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            skipped[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            del calls[name]
    times = _interleaved(calls, repeats)
    for name in compiled & set(calls):  # probed once compiled
        peaks[name] = (_peak(calls[name]), False)
    grads = (n + c) * d * torch.tensor([], dtype=dtype).element_size()
    return times, peaks, grads, skipped


def _interleaved(calls, repeats):
    """name -> (median wall seconds, median CPU seconds of this process) of `repeats` rounds, each
    calling every implementation once. The CPU time leaves out the time the process waits
    descheduled, most of a small call's wall time on a loaded machine; with several threads it
    is their sum."""
    wall, cpu = ({name: [] for name in calls} for _ in range(2))
    for _ in range(repeats):
        for name, call in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}


def huge_entry(repeats, dtype=torch.float32):
    """Ours and the floor at HUGE: (medians, our peak extra bytes)."""
    n, c, d = HUGE
    leaves, y = _inputs(n, c, d, dtype, prenormalized=False)
    raw = leaves[False]
    calls = {"ours": lambda: _step(_ours(0.5), raw, y), FLOOR: floor_step(*raw, float32_out=chunked.bf16_gemm(dtype))}
    for call in calls.values():
        call()
    return _interleaved(calls, repeats), _peak(calls["ours"])


def peer_memory_at(n, c, d, dtype, probe_classes=HUGE_PROBE_CLASSES):
    """Peak extra bytes of each materializing peer at (n, c, d): measured at two class counts,
    extrapolated linearly in C."""
    peers = {k: v for k, v in implementations(n, probe_classes[0], d, with_compile=False).items()
             if not k.startswith("ours") and callable(v) and not getattr(v, "opaque", False)}
    measured = {}
    for classes in probe_classes:
        leaves, y = _inputs(n, classes, d, dtype, prenormalized=True)
        for name, f in peers.items():
            args = (f, leaves[hasattr(f, "prenormalized")], y)
            measured.setdefault(name, []).append(_peak(lambda args=args: _step(*args)))
    (c0, c1) = probe_classes
    return {name: p0 + (p1 - p0) * (c - c0) / (c1 - c0) for name, (p0, p1) in measured.items()}


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


def _mib(nbytes):
    return f"{nbytes / 2**20:,.1f}"


def table(n, c, d, dtype, result):
    times, peaks, grads, skipped = result
    none = (None, None)
    floor, ours, ours0 = times.get(FLOOR, none), times.get("ours", none), times.get("ours m=0", none)
    lines = [f"### (N, C, D) = ({n}, {c:,}, {d}), {str(dtype).replace('torch.', '')}", "",
             "| implementation | fwd+bwd ms | / floor | / ours | / ours m=0 | CPU ms | CPU / floor | CPU / ours "
             "| peak extra MiB (grads incl.) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (t, t_cpu) in times.items():
        peak = "-"
        if name in peaks:
            nbytes, opaque = peaks[name]
            peak = (">= " if opaque else "") + _mib(nbytes)
        ratios = [f"{t / ref[0]:.2f}" if ref[0] else "-" for ref in (floor, ours, ours0)]
        cpu_ratios = [f"{t_cpu / ref[1]:.2f}" if ref[1] else "-" for ref in (floor, ours)]
        lines.append(f"| {name} | {t * 1e3:,.1f} | {' | '.join(ratios)} | {t_cpu * 1e3:,.1f} | "
                     f"{' | '.join(cpu_ratios)} | {peak} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | {why} | | | | | | | |")
    lines += ["", f"Gradients: {_mib(grads)} MiB.", ""]
    return "\n".join(lines)


def huge_table(dtype, result, peers):
    (times, ours_peak), (n, c, d) = result, HUGE
    (floor, _), (ours, _) = times[FLOOR], times["ours"]
    size = torch.tensor([], dtype=dtype).element_size()
    lines = [f"### (N, C, D) = ({n}, {c:,}, {d}), {str(dtype).replace('torch.', '')}: ours only", "",
             f"ours: {ours * 1e3:,.0f} ms forward + backward, {ours / floor:.2f}x the floor ({floor * 1e3:,.0f} ms); "
             f"peak extra memory {_mib(ours_peak)} MiB (gradients {_mib((n + c) * d * size)} MiB; the weight "
             f"itself {_mib(c * d * size)} MiB).", "",
             f"The peers, not run: one N x C {str(dtype).replace('torch.', '')} tensor is {_mib(n * c * size)} MiB. "
             f"Their peak extra memory, measured at C = {HUGE_PROBE_CLASSES[0]:,} and {HUGE_PROBE_CLASSES[1]:,} "
             f"(N = {n}, D = {d}) and extrapolated linearly in C (the cross-entropy peers' pre-normalized "
             "copies of the inputs not counted):", "",
             "| peer | peak extra GiB at C = 10M (computed) | N x C tensors at the peak (beyond the gradients) |",
             "| --- | ---: | ---: |"]
    for name, nbytes in peers.items():
        lines.append(f"| {name} | {nbytes / 2**30:,.1f} | {(nbytes - (n + c) * d * size) / (n * c * size):.1f} |")
    return "\n".join(lines + [""])


def _thp_runs(args, argv):
    """Run this script once per THP_MEM_ALLOC_ENABLE setting in a subprocess (torch reads it at
    start-up), each appending to --out."""
    settings = {"on": ("1",), "off": ("0",), "both": ("0", "1")}[args.thp]
    rest = [a for i, a in enumerate(argv) if a != "--thp" and (i == 0 or argv[i - 1] != "--thp")]
    code = 0
    for value in settings:
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
        code |= subprocess.run([sys.executable, "-m", "bench.cpu_table", *rest], env=env).returncode
    return code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", help="N,C,D triples (default: the table's; the C = 10M entry runs "
                                                    "only without --shapes)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small shapes, 2 repeats, no compile")
    parser.add_argument("--huge-only", action="store_true", help="only the C = 10,000,000 entry")
    parser.add_argument("--no-huge", action="store_true", help="skip the C = 10,000,000 entry")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="implementation names to run (the floor always runs)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--thp", choices=("on", "off", "both"),
                        help="rerun everything in subprocesses with THP_MEM_ALLOC_ENABLE=1 / 0 / each")
    parser.add_argument("--out", help="append the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.thp:
        return _thp_runs(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeats = 2 if args.quick else args.repeats
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    else:
        shapes = [] if args.huge_only else QUICK_SHAPES if args.quick else SHAPES
    huge = not (args.shapes or args.quick or args.no_huge)
    text = [f"Machine: {_machine()}. Medians of {repeats} interleaved repeats.", ""]
    print(text[0], flush=True)
    for n, c, d in shapes:
        block = table(n, c, d, dtype, measure(n, c, d, dtype, repeats, not (args.no_compile or args.quick),
                                              args.only))
        print(block, flush=True)
        text.append(block)
    if huge:
        result = huge_entry(min(repeats, 2), dtype)  # its 10 GiB freed before the peers' probes
        block = huge_table(dtype, result, peer_memory_at(*HUGE, dtype))
        print(block, flush=True)
        text.append(block)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
