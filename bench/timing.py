"""Timing and memory measurement that is right on both CPU and GPU.

On a GPU, `triton.testing.do_bench` does the timing: CUDA events around every call, the L2
cache flushed before each one, the median over the repetitions. On a CPU (the smoke run),
time.perf_counter medians."""

import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup=2, iters=10, setup=None, warmup_ms=25, rep_ms=100):
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls. With `setup`, each
    timed call is fn(setup()) and setup itself is not timed.

    On a GPU without `setup`: `triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
    return_mode="median")` (L2 flushed before every timed call), with `rep_ms` raised so that a
    slow fn still gets about `iters` timed calls. With `setup`, and on a CPU: `iters` timed calls.
    """
    if device.type == "cuda" and setup is None:
        return _do_bench_ms(fn, device, warmup, iters, warmup_ms, rep_ms)

    flush = _l2_flusher(device) if device.type == "cuda" else None

    def call():
        args = (setup(),) if setup is not None else ()
        synchronize(device)
        return args

    for _ in range(warmup):
        fn(*call())
    synchronize(device)
    times = []
    for _ in range(iters):
        args = call()
        if device.type == "cuda":
            # do_bench cannot time this: it has no untimed per-call setup, and calling fn on one
            # setup() result over and over (e.g. loss.backward(retain_graph=True) on one forward)
            # assumes every implementation's backward can run twice on the same saved state and
            # that its cost does not change when it does; custom autograd functions may free or
            # rewrite what they saved. So: a fresh setup() each call, CUDA events, and the same
            # L2 flush as do_bench, enqueued after setup and before the start event.
            flush()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _do_bench_ms(fn, device, warmup, iters, warmup_ms, rep_ms):
    # Only the arguments that triton 3.6 and 3.8 both take (both: fn, warmup, rep, grad_to_none,
    # quantiles, return_mode; warmup and rep in milliseconds).
    from triton.testing import do_bench

    with torch.cuda.device(device):
        for _ in range(warmup):  # compilation and autotuning stay out of do_bench's estimate
            fn()
        synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        # do_bench runs int(rep / its own estimate) timed calls, and its estimate includes the
        # L2 flush: a quarter more than iters x this call's time keeps a slow fn near `iters`.
        rep = max(rep_ms, 1.25 * iters * start.elapsed_time(stop))
        return float(do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median"))


def _l2_flusher(device):
    """do_bench's own L2 flush (a 256 MiB buffer zeroed before each timed call), for the setup path."""
    from triton.runtime import driver

    with torch.cuda.device(device):
        cache = driver.active.get_empty_cache_for_benchmark()
    return lambda: driver.active.clear_cache(cache)


def peak_extra_bytes(fn, device, resident_bytes):
    """Peak GPU memory of fn() beyond what was allocated before plus `resident_bytes`
    (e.g. the gradients it creates); None on a CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before - resident_bytes)


def matmul_tflops(device, dtype=torch.bfloat16):
    """Measured dense matmul rate: 8192^3 on a GPU, a smaller product on a CPU (the floor's rate)."""
    size = 8192 if device.type == "cuda" else 512
    dtype = dtype if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    ms = median_ms(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * size**3 / (ms * 1e-3) / 1e12, size, dtype
