"""Timings for `python -m bench.gpu` (a step it runs as a subprocess): per shape, ours (bf16, each
fused backend available on the GPU) and the insightface-style head in fp32 and bf16; with
--matmul first the bf16 matmul rate. Each measurement is appended to --out as one JSON line the
moment it exists, so a step cut short by the deadline still leaves what it measured.

    python -m bench.gpu_bench --out bench/out/gpu_bench.jsonl --matmul --shapes 4096,262144,512
"""

import argparse
import json

import torch

from . import peers
from .compare import MARGINS, make_inputs, parse_shape

SPEC = dict(scale=64.0, **MARGINS["arcface"])


def median_ms(fn, iters, warmup=1):
    """Median of iters CUDA-event timings of fn() after warmup calls (the first compiles kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_rate(size=8192, iters=10):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=g)
    return 2 * size**3 / (median_ms(lambda: a @ b, iters, warmup=3) * 1e-3) / 1e12


def implementations():
    from arcface_kernels.backends import backend_status

    ours = [(f"arcface_kernels[{b}]", "bf16", peers.ours(b)) for b in ("triton", "cuda")
            if backend_status(b, torch.device("cuda"), torch.bfloat16)[0]]
    return ours + [("insightface-style", "fp32", peers.insightface_style),
                   ("insightface-style", "bf16", peers.insightface_style)]


def time_one(loss_fn, x, w, y, iters):
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def forward():
        loss_fn(xg, wg, y, SPEC)

    def step():
        xg.grad = wg.grad = None
        loss_fn(xg, wg, y, SPEC).backward()

    return dict(fwd_ms=median_ms(forward, iters), total_ms=median_ms(step, iters))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", type=parse_shape, nargs="+", required=True)
    p.add_argument("--matmul", action="store_true", help="measure the bf16 matmul rate first")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    def emit(record):
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(record, flush=True)

    if args.matmul:
        emit(dict(kind="matmul", size=8192, tflops=matmul_rate()))
    for n, c, d in args.shapes:
        x, w, y = make_inputs(n, c, d, torch.bfloat16, torch.device("cuda"))
        for name, dtype, fn in implementations():
            row = dict(kind="timing", impl=name, dtype=dtype, n=n, c=c, d=d)
            xx, ww = (x.float(), w.float()) if dtype == "fp32" else (x, w)
            try:
                row.update(time_one(fn, xx, ww, y, args.iters), status="ok")
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as err:  # a failing implementation is a row, not the end of the step
                row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            del xx, ww
            torch.cuda.empty_cache()
            emit(row)


if __name__ == "__main__":
    main()
