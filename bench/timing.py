"""Timing and memory measurement that is right on both CPU and GPU."""

import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup=2, iters=10, setup=None):
    """Median wall time of fn() in milliseconds (CUDA events on a GPU, after warm-up). With
    `setup`, each timed call is fn(setup()) and setup itself is not timed."""

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
