"""One command, one process: every implementation at every shape, against the floor.

    python -m bench.compare                 # docs/design.md section 8 headline shapes (GPU)
    python -m bench.compare --quick         # tiny shapes, CPU smoke run
    python -m bench.compare --shapes 1024,360232,512 --margin arcface --write-results

Per implementation and shape: relative error against an oracle (the `torch` backend on float32
copies), forward, backward and forward+backward medians (each timed on its own), peak extra memory
beyond inputs and gradients, efficiency against the floor (4 x 2NCD flops at the bf16 matmul
rate measured in the same run) and speedups against the insightface-style head in the inputs'
dtype (bf16 logits, as arcface_torch trains: the main eager peer) and torch.compile of the
reference. The `eager reference` row upcasts to float32 and is shown, not used as the baseline.
"""

import argparse
import datetime
import os
import platform

import torch
from tqdm import tqdm

from . import peers
from .timing import matmul_tflops, median_ms, peak_extra_bytes

HEADLINE_SHAPES = [(512, 93431, 512), (1024, 360232, 512), (4096, 262144, 512), (1024, 2059906, 512),
                   (4096, 262144, 128), (4096, 262144, 256)]
QUICK_SHAPES = [(16, 300, 32), (16, 1200, 32)]
MARGINS = {"arcface": dict(m1=1.0, m2=0.5, m3=0.0), "cosface": dict(m1=1.0, m2=0.0, m3=0.35),
           "softmax": dict(m1=1.0, m2=0.0, m3=0.0)}
TABLE_NOTE = ("Relative error is the worst of loss, dX and dW against the `torch` backend on float32 "
              "copies, with the exact margin gradient; the insightface-style head uses a straight-through "
              "margin gradient by design, so its error is large. Forward, backward and total are separate medians.")
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


def measure(loss_fn, x, w, y, spec, oracle, device, iters):
    """One implementation at one shape: a dict of the report's columns."""
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def forward():
        return loss_fn(xg, wg, y, spec)

    def step():
        xg.grad = wg.grad = None
        forward().backward()

    loss = forward()
    loss.backward()
    error = max(_rel(loss.detach(), oracle[0]), _rel(xg.grad, oracle[1]), _rel(wg.grad, oracle[2]))
    fwd = median_ms(forward, device, iters=iters)

    def fresh_loss():
        xg.grad = wg.grad = None
        return forward()

    bwd = median_ms(lambda loss: loss.backward(), device, iters=iters, setup=fresh_loss)
    total = median_ms(step, device, iters=iters)
    grads = xg.numel() * xg.element_size() + wg.numel() * wg.element_size()
    xg.grad = wg.grad = None
    extra = peak_extra_bytes(step, device, grads)
    return dict(error=error, fwd=fwd, bwd=bwd, total=total, extra=extra)


def run(shapes, dtype, margin, device, iters, progress=True):
    tflops, mm_size, mm_dtype = matmul_tflops(device)
    spec = dict(scale=64.0, **MARGINS[margin])
    rows = []
    impls = peers.implementations(device, peers.is_plain_softmax(spec))
    bar = tqdm(total=len(shapes) * len(impls), disable=not progress, desc="bench")
    for n, c, d in shapes:
        x, w, y = make_inputs(n, c, d, dtype, device)
        xo = x.detach().float().clone().requires_grad_(True)
        wo = w.detach().float().clone().requires_grad_(True)
        oracle_loss = peers.ours("torch")(xo, wo, y, spec)
        oracle_loss.backward()
        oracle = (oracle_loss.detach(), xo.grad, wo.grad)
        floor = peers.floor_ms(n, c, d, tflops)
        for name, impl in impls:
            bar.set_postfix_str(f"{name} {n}x{c}x{d}")
            row = dict(impl=name, n=n, c=c, d=d, floor=floor)
            if isinstance(impl, str):
                row["status"] = impl
            else:
                try:
                    row.update(measure(impl, x, w, y, spec, oracle, device, iters), status="ok")
                except Exception as err:  # an OOM (or a peer's failure) is a row, not a crash
                    if not _oom(err):
                        row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                    else:
                        row["status"] = "OOM"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            bar.update()
        del x, w, y, xo, wo, oracle
    bar.close()
    return rows, dict(tflops=tflops, mm_size=mm_size, mm_dtype=str(mm_dtype).replace("torch.", ""), spec=spec)


def _speedups(rows):
    """Speedup of each row's total against the insightface-style head and torch.compile at its shape."""
    base = {}
    for r in rows:
        if r.get("status") == "ok" and r["impl"] in ("insightface-style", "torch.compile(reference)"):
            base[(r["n"], r["c"], r["d"], r["impl"])] = r["total"]
    for r in rows:
        key = (r["n"], r["c"], r["d"])
        for label, impl in (("vs_eager", "insightface-style"), ("vs_compile", "torch.compile(reference)")):
            ref = base.get(key + (impl,))
            r[label] = ref / r["total"] if ref and r.get("status") == "ok" else None


def format_table(rows):
    _speedups(rows)

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| shape N x C x D | implementation | status | rel. error vs exact | fwd ms | bwd ms | total ms | "
             "peak extra MiB | efficiency | speedup vs insightface-style | speedup vs compile |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ok = r.get("status") == "ok"
        extra = r.get("extra")
        lines.append(
            f"| {r['n']} x {r['c']} x {r['d']} | {r['impl']} | {r['status']} | "
            f"{num(r.get('error'), '.1e')} | {num(r.get('fwd'), '.3f')} | {num(r.get('bwd'), '.3f')} | "
            f"{num(r.get('total'), '.3f')} | "
            f"{'n/a' if ok and extra is None else num(extra and extra / 2**20, '.1f')} | "
            f"{num(r['floor'] / r['total'] if ok else None, '.1%')} | {num(r.get('vs_eager'), '.2f')} | "
            f"{num(r.get('vs_compile'), '.2f')} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["c"], r["total"], r.get("extra")) for r in rows if r["impl"] == name and r["status"] == "ok")
        if not pts:
            continue
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if all(p[2] is not None for p in pts):
            ax_m.plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=name)
    ax_t.set(xscale="log", yscale="log", xlabel="classes C", ylabel="forward+backward ms (median)")
    ax_m.set(xscale="log", xlabel="classes C", ylabel="peak extra memory, MiB")
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "memory is measured on a GPU only", ha="center", transform=ax_m.transAxes)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def environment(device, meta):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [f"- date: {datetime.date.today().isoformat()}",
             f"- device: {name}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda})"]
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
    return "\n".join(lines)


def _driver():
    try:
        import subprocess

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
                   help="'softmax' (no margin) adds cut-cross-entropy and liger-kernel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--write-results", action="store_true", help="also write bench/RESULTS.md and its plot")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else HEADLINE_SHAPES)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    iters = args.iters or (5 if args.quick else 20)
    rows, meta = run(shapes, dtype, args.margin, device, iters)
    table = format_table(rows)
    os.makedirs(args.out, exist_ok=True)
    header = f"# arcface_kernels comparison ({args.dtype if device.type == 'cuda' else 'fp32'}, {device.type})\n\n"
    report = header + environment(device, meta) + "\n\n" + table + "\n\n" + TABLE_NOTE + "\n"
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
