"""One command, one process: every implementation at every shape, against the floor.

    python -m bench.compare                 # docs/design.md section 8 headline shapes (GPU)
    python -m bench.compare --quick         # tiny shapes, CPU smoke run
    python -m bench.compare --shapes 1024,360232,512 --margin arcface --write-results

Per implementation and shape: relative error against an oracle (the `torch` backend on float32
copies); forward, backward and total (forward + backward of the same calls, so total >= forward)
times; peak extra memory of each pass beside its time; efficiency against the floor (4 x 2NCD
flops at the matmul rate measured in the same run); and speedups against the insightface-style
head in the inputs' dtype (bf16 logits on a GPU, as arcface_torch trains: the main eager peer)
and torch.compile of the reference.

Times are medians of interleaved repeats: each repeat times every implementation in turn (`--iters`
calls each, their median), the order rotating from repeat to repeat, so that a slow spell of the
machine spreads over all of them; a time is the median over the repeats, with the spread (the
range of the repeats' medians) beside it. A speedup whose two ranges overlap is within the noise:
it is shown as "~" and flagged, not as a number.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess

import torch
from tqdm import tqdm

from . import peers
from .timing import matmul_tflops, peak_extra_bytes, step_times

HEADLINE_SHAPES = [(512, 93431, 512), (1024, 360232, 512), (4096, 262144, 512), (1024, 2059906, 512),
                   (4096, 262144, 128), (4096, 262144, 256)]
QUICK_SHAPES = [(16, 300, 32), (16, 1200, 32)]
MARGINS = {"arcface": dict(m1=1.0, m2=0.5, m3=0.0), "cosface": dict(m1=1.0, m2=0.0, m3=0.35),
           "softmax": dict(m1=1.0, m2=0.0, m3=0.0)}
TABLE_NOTE = ("Relative error is the worst of loss, dX and dW against the `torch` backend on float32 "
              "copies, with the exact margin gradient; the insightface-style head uses a straight-through "
              "margin gradient by design, so its error is large. Each time is the median over {repeats} interleaved "
              "repeats of the median of {iters} calls, +- half the range of the repeats' medians; forward and "
              "backward are the two halves of the same calls and total their sum, so total >= forward. Peak extra "
              "memory (MiB) is beyond what was allocated before the pass, less the gradients it leaves "
              "(on a CPU: the profiler's allocation events). A speedup marked ~ is within the noise: the two "
              "implementations' ranges of repeat medians overlap; it is not a speedup.")
CPU_NOTICE = ("**This is a CPU smoke run, not the GPU report.** The GPU report at the headline shapes "
              "has not been produced yet; on a GPU machine run `python -m bench.gpu` (build, GPU tests, then "
              "`python -m bench.compare --write-results`) "
              "(and `--margin softmax` for the fused linear-cross-entropy peers). CPU times say nothing "
              "about GPU speed.\n")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(n, c, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    w = torch.randn(c, d, device=device, dtype=dtype, generator=g)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    return x, w, y


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _median_and_spread(values):
    return dict(median=statistics.median(values), low=min(values), high=max(values))


def check(loss_fn, xg, wg, y, spec, oracle):
    """The worst relative error of loss, dX, dW (one forward and backward: it also compiles
    whatever compiles, before any timing)."""
    xg.grad = wg.grad = None
    loss = loss_fn(xg, wg, y, spec)
    loss.backward()
    return max(_rel(loss.detach(), oracle[0]), _rel(xg.grad, oracle[1]), _rel(wg.grad, oracle[2]))


def memory(loss_fn, xg, wg, y, spec, device):
    """Peak extra bytes of forward, backward and forward + backward."""
    grads = xg.numel() * xg.element_size() + wg.numel() * wg.element_size()

    def forward():
        xg.grad = wg.grad = None
        return loss_fn(xg, wg, y, spec)

    fwd = peak_extra_bytes(forward, device)
    loss = forward()
    bwd = peak_extra_bytes(loss.backward, device, grads)
    del loss
    xg.grad = wg.grad = None
    total = peak_extra_bytes(lambda: forward().backward(), device, grads)
    return dict(fwd=fwd, bwd=bwd, total=total)


def run(shapes, dtype, margin, device, iters, repeats, progress=True):
    tflops, mm_size, mm_dtype = matmul_tflops(device)
    spec = dict(scale=64.0, **MARGINS[margin])
    rows = []
    impls = peers.implementations(device, peers.is_plain_softmax(spec))
    bar = tqdm(total=len(shapes) * len(impls) * (repeats + 1), disable=not progress, desc="bench")
    for n, c, d in shapes:
        x, w, y = make_inputs(n, c, d, dtype, device)
        xo = x.detach().float().clone().requires_grad_(True)
        wo = w.detach().float().clone().requires_grad_(True)
        oracle_loss = peers.ours("torch")(xo, wo, y, spec)
        oracle_loss.backward()
        oracle = (oracle_loss.detach(), xo.grad, wo.grad)
        floor = peers.floor_ms(n, c, d, tflops)
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)  # every implementation's leaves
        shape_rows, live = [], []
        for name, impl in impls:
            bar.set_postfix_str(f"{name} {n}x{c}x{d}")
            row = dict(impl=name, n=n, c=c, d=d, floor=floor)
            if isinstance(impl, str):
                row["status"] = impl
            else:
                try:
                    row["error"] = check(impl, xg, wg, y, spec, oracle)
                    row["memory"] = memory(impl, xg, wg, y, spec, device)
                    row.update(status="ok", samples=[])
                    live.append((row, impl))
                except Exception as err:  # an OOM (or a peer's failure) is a row, not a crash
                    _failed(row, err, device)
            shape_rows.append(row)
            bar.update()
        for repeat in range(repeats):  # interleaved, the order rotating by one each repeat
            k = repeat % max(len(live), 1)
            _time_repeat(live[k:] + live[:k], xg, wg, y, spec, device, iters)
            bar.update(len(impls))
        for row in shape_rows:
            samples = row.pop("samples", None)
            if row["status"] == "ok":
                for i, key in enumerate(("fwd", "bwd", "total")):
                    row[key] = _median_and_spread([sample[i] for sample in samples])
        rows += shape_rows
        del x, w, y, xo, wo, xg, wg, oracle, live
    bar.close()
    meta = dict(tflops=tflops, mm_size=mm_size, mm_dtype=str(mm_dtype).replace("torch.", ""), spec=spec,
                iters=iters, repeats=repeats)
    return rows, meta


def _time_repeat(live, xg, wg, y, spec, device, iters):
    """One repeat: every implementation in `live` in turn, the median of `iters` calls each."""

    def clear():
        xg.grad = wg.grad = None

    for row, impl in live:
        if row["status"] != "ok":
            continue

        def forward(impl=impl):
            return impl(xg, wg, y, spec)

        try:
            times = step_times(forward, device, iters, before=clear)
        except Exception as err:
            _failed(row, err, device)
            continue
        row["samples"].append([statistics.median(t[i] for t in times) for i in range(3)])


def _failed(row, err, device):
    row["status"] = "OOM" if _oom(err) else f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()


def baseline_names(device):
    """The two baselines of the speedup columns: the insightface-style head with its logits in the
    inputs' dtype (bf16 on a GPU, fp32 on a CPU) and torch.compile of the reference."""
    return ("insightface-style (bf16)" if device.type == "cuda" else "insightface-style (fp32)",
            "torch.compile(reference)")


def _speedups(rows, baselines):
    """Each row's speedup (baseline total / its total) against each baseline at its shape, or "~"
    where the two ranges of repeat medians overlap (within the noise)."""
    base = {(r["n"], r["c"], r["d"], r["impl"]): r["total"] for r in rows
            if r.get("status") == "ok" and r["impl"] in baselines}
    for r in rows:
        r["speedups"] = []
        for impl in baselines:
            ref = base.get((r["n"], r["c"], r["d"], impl))
            if ref is None or r.get("status") != "ok":
                r["speedups"].append(None)
            elif r["total"]["low"] <= ref["high"] and ref["low"] <= r["total"]["high"]:
                r["speedups"].append("~")
            else:
                r["speedups"].append(ref["median"] / r["total"]["median"])


def format_table(rows, baselines):
    _speedups(rows, baselines)

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    def time(t):
        return "-" if t is None else f"{t['median']:.3f} +- {(t['high'] - t['low']) / 2:.3f}"

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.2f}"

    def speedup(v):
        return "-" if v is None else "~ (noise)" if v == "~" else f"{v:.2f}"

    lines = ["| shape N x C x D | implementation | status | rel. error vs exact | fwd ms | fwd MiB | bwd ms | "
             f"bwd MiB | total ms | total MiB | efficiency | speedup vs {baselines[0]} | speedup vs compile |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ok = r.get("status") == "ok"
        mem = r.get("memory") or {}
        lines.append(
            f"| {r['n']} x {r['c']} x {r['d']} | {r['impl']} | {r['status']} | {num(r.get('error'), '.1e')} | "
            f"{time(r.get('fwd'))} | {mib(mem.get('fwd'))} | {time(r.get('bwd'))} | {mib(mem.get('bwd'))} | "
            f"{time(r.get('total'))} | {mib(mem.get('total'))} | "
            f"{num(r['floor'] / r['total']['median'] if ok else None, '.1%')} | "
            f"{speedup(r['speedups'][0])} | {speedup(r['speedups'][1])} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["c"], r["total"]["median"], r["memory"]["total"]) for r in rows
                     if r["impl"] == name and r["status"] == "ok")
        if not pts:
            continue
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax_m.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=name)
    ax_t.set(xscale="log", yscale="log", xlabel="classes C", ylabel="forward+backward ms (median of repeats)")
    ax_m.set(xscale="log", xlabel="classes C", ylabel="peak extra memory of forward+backward, MiB")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device, meta):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        gib = _memory_gib()
        name = (f"{_cpu_name()}, {os.cpu_count()} cores, {gib:.0f} GiB" if gib else _cpu_name()) + \
            f", torch using {torch.get_num_threads()} threads"
    load = f" (load average {os.getloadavg()[0]:.1f} when the run ended)" if hasattr(os, "getloadavg") else ""
    lines = [f"- date: {datetime.date.today().isoformat()}, commit {_commit()}",
             f"- device: {name}{load}",
             f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    if device.type == "cuda":
        lines.append(f"- driver: {_driver()}")
    try:
        import triton

        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        pass
    lines.append(f"- floor rate: {meta['tflops']:.3g} TFLOP/s measured on a {meta['mm_size']}^3 "
                 f"{meta['mm_dtype']} matmul in this run")
    lines.append(f"- loss: scale {meta['spec']['scale']}, m = ({meta['spec']['m1']}, {meta['spec']['m2']}, "
                 f"{meta['spec']['m3']})")
    lines.append(f"- timing: {meta['repeats']} interleaved repeats of {meta['iters']} calls per implementation")
    return "\n".join(lines)


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_shape(text):
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a shape is N,C,D with positive integers, got {text!r}")
    return tuple(parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (CPU smoke run)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", help="N,C,D triples")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--margin", choices=MARGINS, default="arcface",
                   help="'softmax' (no margin) adds F.linear_cross_entropy, cut-cross-entropy and liger-kernel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None, help="timed calls per implementation and repeat")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (the spread is over these)")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--write-results", action="store_true", help="also write bench/RESULTS.md and its plot")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else HEADLINE_SHAPES)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    iters = args.iters or (5 if args.quick else 20)
    repeats = args.repeats or 5
    rows, meta = run(shapes, dtype, args.margin, device, iters, repeats)
    table = format_table(rows, baseline_names(device))
    os.makedirs(args.out, exist_ok=True)
    header = f"# arcface_kernels comparison ({args.dtype if device.type == 'cuda' else 'fp32'}, {device.type})\n\n"
    note = TABLE_NOTE.format(repeats=repeats, iters=iters)
    report = header + environment(device, meta) + "\n\n" + table + "\n\n" + note + "\n"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    plot(rows, os.path.join(args.out, "report.png"))
    if args.write_results:
        bench_dir = os.path.dirname(os.path.abspath(__file__))
        results = report.replace("# arcface_kernels comparison", "# Results: arcface_kernels comparison", 1)
        if device.type != "cuda":
            title, rest = results.split("\n", 1)
            results = f"{title}\n\n{CPU_NOTICE}\n{rest}"
        with open(os.path.join(bench_dir, "RESULTS.md"), "w") as f:
            f.write(results + "\n![time and memory against the number of classes](results.png)\n")
        plot(rows, os.path.join(bench_dir, "results.png"))
    print(report)
    print(f"wrote {os.path.join(args.out, 'report.md')} and report.png")
    return rows


if __name__ == "__main__":
    main()
