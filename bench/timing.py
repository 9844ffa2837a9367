"""Timing and memory measurement that is right on both CPU and GPU.

A training step is timed as one call split in two: forward, then backward, with a timestamp
between them (CUDA events on a GPU, with the L2 cache flushed before each step as
triton.testing.do_bench does; time.perf_counter on a CPU). So each call's total is its forward
plus its backward, and total >= forward holds for every call and for their medians.

Peak extra memory: the caching allocator's peak on a GPU; on a CPU the profiler's allocation
events (allocations minus frees, in order)."""

import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(forward, device, iters, warmup=1, before=None):
    """[(forward ms, backward ms, total ms)] for `iters` calls of forward().backward(), after
    `warmup` untimed ones; before() (untimed) runs ahead of each call (e.g. to clear gradients)."""
    flush = _l2_flusher(device) if device.type == "cuda" else None
    times = []
    for i in range(warmup + iters):
        if before is not None:
            before()
        synchronize(device)
        if device.type == "cuda":
            flush()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            loss = forward()
            marks[1].record()
            loss.backward()
            marks[2].record()
            marks[2].synchronize()
            fwd, bwd = marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])
        else:
            t0 = time.perf_counter()
            loss = forward()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd, bwd = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        if i >= warmup:
            times.append((fwd, bwd, fwd + bwd))
    return times


def _l2_flusher(device):
    """do_bench's own L2 flush (a 256 MiB buffer zeroed before each timed call)."""
    from triton.runtime import driver

    with torch.cuda.device(device):
        cache = driver.active.get_empty_cache_for_benchmark()
    return lambda: driver.active.clear_cache(cache)


def peak_extra_bytes(fn, device, resident_bytes=0):
    """Peak memory allocated while fn() runs beyond what was allocated when it began, less
    `resident_bytes` (e.g. the gradients it leaves behind)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before - resident_bytes)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return max(0, peak - resident_bytes)


def matmul_tflops(device, dtype=torch.bfloat16):
    """Measured dense matmul rate: 8192^3 on a GPU, a smaller product on a CPU (the floor's rate):
    the median of 10 timed calls."""
    size = 8192 if device.type == "cuda" else 512
    dtype = dtype if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    times = []
    for i in range(13):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e12, size, dtype
