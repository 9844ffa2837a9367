"""Predicted time of one bf16 training step (forward + backward) on an H100, launch by launch, for
the `triton` and `cuda` backends: one model for both. A prediction, not a measurement: every rate
below is an assumption (listed in ASSUMPTIONS, printed with the table); `python -m bench.gpu`
measures the real thing.

    python -m bench.cost_model      # the tables of docs/backends/triton.md and cuda.md

The launch list (`launches`) is the real launch plan of the driver code, counted from it: the
entry checks, the norm pass (common.overflow_safe_rows on a GPU: one triton/norms.py kernel per
matrix, which also writes the embeddings' copy scaled for headroom; the class rows are only
read), the embeddings' copy made again and dX scaled by op.backward_core (no host sync:
docs/design.md section 2), the backend's kernels (Triton grids from configs.py and the forward's
class splits; the `cuda` ops' internal GEMMs and kernels from csrc/), every chunk of the backward
walk (chunk_plan.chunk_classes) with its GEMMs and projection, and the glue of
finalize, the target gradient and the reduction. tests/test_cost_model.py checks that it equals,
op for op, what the driver code launches at the headline shape (kernels stubbed, recorded on
the CPU with tests/launch_probe.py); launches inside the `cuda` extension's ops are invisible to
that probe and come from reading csrc/forward.cu and csrc/backward.cu.

Time of a launch = LAUNCH_GAP + its work, work being
- ATen element-wise / reduction ops: bytes / HBM (row vectors: ~0, so the gap alone);
- a host sync: SYNC (the stream drains, the host reads, the queue starts empty again);
- cuBLAS GEMMs: max(flops / (TFLOPS * efficiency), bytes / HBM), efficiency CUBLAS_EFFICIENCY
  or, where a leading dimension is not a multiple of 16 bytes (no TMA), UNALIGNED_CUBLAS_EFFICIENCY;
- Triton tile kernels, from their compile for sm_90 (SASS_FACTS: registers and shared memory
  give the CTAs per SM; the static SASS instruction count of the per-tile epilogue, everything
  outside the K loop, gives its issue time): waves = ceil(programs / (SMs * CTAs per SM)), and
  per wave and tile, with one CTA per SM, MMA time + epilogue issue time + a pipeline refill
  (nothing else on the SM hides them); with two or more, the larger of the CTAs' summed MMA time
  and summed issue time;
- the `cuda` extension's epilogue kernels: their bytes (their instruction counts are not
  modelled: an optimistic bound).
The floor is 4 x 2NCD flops at TFLOPS.
"""

from collections import Counter
from types import SimpleNamespace
from typing import NamedTuple

import torch

from arcface_kernels.backends import chunk_plan
from arcface_kernels.backends import triton as triton_backend
from arcface_kernels.backends.common import DEFAULT_WORKSPACE_BUDGET
from arcface_kernels.backends.triton.configs import CONFIGS

HEADLINE_SHAPES = [(512, 93431, 512), (1024, 360232, 512), (4096, 262144, 512), (1024, 2059906, 512),
                   (4096, 262144, 128), (4096, 262144, 256)]

# --- assumptions (H100 SXM, bf16) -------------------------------------------------------------
TFLOPS = 798e12  # dense bf16 tensor rate, also the floor's rate
HBM = 3.0e12  # bytes / s
SMS, CLOCK = 132, 1.755e9
ISSUE_PER_CLOCK = 4  # warp instructions per SM per clock (4 schedulers)
MAINLOOP_EFFICIENCY = 0.75  # fraction of an SM's tensor rate a Triton wgmma K loop reaches
CUBLAS_EFFICIENCY = 0.80
UNALIGNED_CUBLAS_EFFICIENCY = 0.65  # leading dimension not 16-byte aligned: no TMA kernels
LAUNCH_GAP = 2.5e-6  # seconds between back-to-back kernels on one stream (launch, ramp, tail)
SYNC = 15e-6  # a host sync: drain, device-to-host read, empty queue refilled
REFILL = 0.7e-6  # a tile's pipeline fill (num_stages - 1 loads of DRAM latency), one CTA per SM
# what the launch code reads from torch.cuda.get_device_properties (tests/launch_probe.py's H100)
H100 = SimpleNamespace(multi_processor_count=SMS, regs_per_multiprocessor=65536,
                       shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
ASSUMPTIONS = (
    f"H100 SXM: {TFLOPS / 1e12:.0f} TFLOP/s bf16 (the floor's rate too), {HBM / 1e12:.1f} TB/s HBM, {SMS} SMs at "
    f"{CLOCK / 1e9:.3f} GHz issuing {ISSUE_PER_CLOCK} warp instructions per clock; Triton K loop at "
    f"{MAINLOOP_EFFICIENCY:.0%} of the tensor rate, cuBLAS at {CUBLAS_EFFICIENCY:.0%} "
    f"({UNALIGNED_CUBLAS_EFFICIENCY:.0%} with a leading dimension not 16-byte aligned); "
    f"{LAUNCH_GAP * 1e6:.1f} us per launch, {SYNC * 1e6:.0f} us per host sync, {REFILL * 1e6:.1f} us pipeline "
    "refill per tile at one CTA per SM; the `cuda` epilogue kernels at their HBM bytes only.")

# Compiled for sm_90 with the JIT's runtime specialization (tests/triton_build.py, triton 3.8, the
# configs of configs.py, the headline shape): ptxas registers and the kernel's shared memory;
# epilogue = static SASS instructions per warp outside the K loop in one tile's code (nvdisasm of
# the cubin: the forward's class-tile loop is 1,112 instructions of which the K loop is 69; the
# gradient tile kernel, one tile per program, 936 of which 87 are the K loop). Static counts
# include branches most tiles skip (the target's tile, the sub-centre and smoothing paths): an
# upper bound on the issue time.
SASS_FACTS = {
    "forward": dict(registers=167, smem=32768, epilogue=1112 - 69),
    "grad_tile": dict(registers=100, smem=73728, epilogue=936 - 87),
}

# --- the glue, as the driver code runs it (op names as the probe records them) -----------------
# the margins as (N,) tensors; validation.target_labels on a GPU: the label rule as a device-side
# assert (labels_in_range, no host read), the targets; the active rows
ENTRY = "full full full eq where div eq all _assert_async where ge".split()
# triton/forward.combine_splits
COMBINE_SPLITS = "max sub exp argmax mul sum sum sum sum gather gather mul sum".split()
# op.finalize, outputs, api.reduce_rows
FORWARD_TAIL = "log add log add sub zeros_like logaddexp where where clone clone ne sum sum clamp_min div".split()
# autograd of the reduction, op._backward's labels and gradient rows
BACKWARD_HEAD = "ones_like div eq where ge where".split()
# after op._rows_seen's copy of the embeddings: op.backward_core's target factor (op.target_cosine_gradient with
# margins.dphi_dcos, once per row) and target dcos, chunked_backward's setup
BACKWARD_SETUP = (
    "ne clamp acos mul add div floor clamp_min remainder mul rsub mul rsub clamp_min sqrt clamp_min lt mul div sinc "
    "mul div sinc div mul sin div where mul cos mul sin mul cos mul div add mul eq ge __and__ ones_like where neg "
    "expm1 add mul mul where mul zeros lt where").split()
# projection_factor of rx before the final dX projection
BACKWARD_TAIL_HEAD = "lt where".split()


class Launch(NamedTuple):
    pass_: str  # "forward" | "backward"
    name: str  # what runs
    op: str | None  # what tests/launch_probe.py records for it; None: inside a `cuda` extension op
    seconds: float  # predicted
    flops: float = 0.0
    hbm_bytes: float = 0.0

    @property
    def op_is_parent(self):
        """A `cuda` extension op's own entry: its launches are listed separately."""
        return self.op is not None and self.op.startswith("cuda-op:")


def _cdiv(a, b):
    return -(-a // b)


def _aten(pass_, names, nbytes=0.0, what="glue"):
    return [Launch(pass_, f"{what}: {name}", "sync" if name == "sync" else name,
                   SYNC if name == "sync" else LAUNCH_GAP + nbytes / HBM, 0.0, nbytes) for name in names]


def _gemm(pass_, name, op, m, n, k, nbytes, aligned=True):
    flops = 2.0 * m * n * k
    eff = CUBLAS_EFFICIENCY if aligned else UNALIGNED_CUBLAS_EFFICIENCY
    return Launch(pass_, name, op, LAUNCH_GAP + max(flops / (TFLOPS * eff), nbytes / HBM), flops, nbytes)


def ctas_per_sm(kernel):
    """The launch code's occupancy rule (triton.ctas_per_sm) on the compile figures, on an H100."""
    facts = SASS_FACTS[kernel]
    return triton_backend.ctas_per_sm(facts["registers"], facts["smem"], CONFIGS[kernel].num_warps, H100)


def tile_kernel(pass_, kernel, op, programs, tiles_per_program, d):
    """A Triton kernel of `programs` CTAs walking `tiles_per_program` BLOCK_M x BLOCK_N tiles each."""
    cfg, k = CONFIGS[kernel], ctas_per_sm(kernel)
    mma = 2.0 * cfg.block_m * cfg.block_n * d / (TFLOPS / SMS * MAINLOOP_EFFICIENCY)
    issue = SASS_FACTS[kernel]["epilogue"] * cfg.num_warps / (ISSUE_PER_CLOCK * CLOCK)
    per_tile = mma + issue + REFILL if k == 1 else max(k * mma, k * issue)
    waves = -(-programs // (SMS * k))
    flops = 2.0 * cfg.block_m * cfg.block_n * d * programs * tiles_per_program
    return Launch(pass_, f"{kernel} kernel: {programs} programs, {k} CTA/SM, {waves} waves", op,
                  LAUNCH_GAP + waves * tiles_per_program * per_tile, flops, 0.0)


def _norm_pass(pass_, rows, d, name, write_seen, itemsize=2):
    """common.overflow_safe_rows on a GPU (sync_free, bf16): triton/norms.row_norms_kernel reads
    each row once and, for the embeddings (write_seen: seen scaled for headroom), writes the copy;
    the class rows are only read. In backward op._rows_seen makes the embeddings' copy again."""
    nbytes = (2 if write_seen else 1) * itemsize * rows * d
    return [Launch(pass_, name, "triton:row_norms_kernel", LAUNCH_GAP + nbytes / HBM, 0.0, nbytes)]


def _triton_forward(n, c, d):
    cfg = CONFIGS["forward"]
    row_blocks = _cdiv(n, cfg.block_m)
    # the launch code's split rule for a wave of SMs x CTAs per SM programs
    per_split, splits = triton_backend.class_splits(row_blocks, c, cfg.block_n, SMS * ctas_per_sm("forward"))
    return [tile_kernel("forward", "forward", "triton:partial_stats_kernel", row_blocks * splits,
                        per_split // cfg.block_n, d)] + _aten("forward", COMBINE_SPLITS, what="combine splits")


def _cuda_forward(n, c, d):
    """csrc/forward.cu partial_stats: 8 fills, then per chunk of the float32 dots the GEMM,
    segment_stats and merge_segments (chunk: classes_per_chunk within the workspace budget)."""
    from arcface_kernels.backends.cuda import CLASS_ALIGN

    chunk = max(1, min(c, DEFAULT_WORKSPACE_BUDGET // (4 * n)))  # csrc/chunk_size.h classes_per_chunk
    chunk = chunk // CLASS_ALIGN * CLASS_ALIGN if chunk >= CLASS_ALIGN else chunk
    out = [Launch("forward", "partial_stats", "cuda-op:partial_stats", 0.0)]
    out += [Launch("forward", "partial_stats: fill", None, LAUNCH_GAP) for _ in range(8)]
    for first in range(0, c, chunk):
        width = min(chunk, c - first)
        out.append(_gemm("forward", "partial_stats: GEMM dots (fp32 out)", None, n, width, d,
                         4 * n * width + 2 * width * d + 2 * n * d, aligned=width * 2 % 16 == 0))
        out.append(Launch("forward", "partial_stats: segment_stats", None, LAUNCH_GAP + 4 * n * width / HBM,
                          0.0, 4 * n * width))
        out.append(Launch("forward", "partial_stats: merge_segments", None, LAUNCH_GAP))
    return out


def _backward(backend, n, c, d):
    out = _aten("backward", BACKWARD_HEAD) + _norm_pass("backward", n, d, "rows seen: x again (norm kernel)", True)
    out += _aten("backward", BACKWARD_SETUP)
    if backend == "triton":
        step = chunk_plan.chunk_classes(n, c, 1, d, torch.bfloat16, None, CONFIGS["grad_tile"].block_n)
    else:
        from arcface_kernels.backends import cuda as cuda_backend

        step = chunk_plan.chunk_classes(n, c, 1, d, torch.bfloat16, cuda_backend.backward_budget(n, d, torch.bfloat16),
                                        cuda_backend.CLASS_ALIGN)
    g = CONFIGS["grad_tile"]
    for first in range(0, c, step):
        width = min(step, c - first)
        if backend == "triton":
            out.append(tile_kernel("backward", "grad_tile", "triton:grad_tile_kernel",
                                   -(-n // g.block_m) * -(-width // g.block_n), 1, d))
        else:  # csrc/backward.cu grad_chunk: the float32 dots GEMM, then gradient_tile
            out.append(Launch("backward", "grad_chunk", "cuda-op:grad_chunk", 0.0))
            out.append(_gemm("backward", "grad_chunk: GEMM dots (fp32 out)", None, n, width, d,
                             4 * n * width + 2 * width * d + 2 * n * d))  # rows padded to 16 bytes
            out.append(Launch("backward", "grad_chunk: gradient_tile", None, LAUNCH_GAP + 6 * n * width / HBM,
                              0.0, 6 * n * width))
        aligned = step * 2 % 16 == 0  # G's rows are a full chunk apart in the last chunk too
        # B += G W_c: G (bf16, L2), W_c from HBM, B float32 read and written
        out.append(_gemm("backward", "GEMM B += G W_c", "addmm", n, d, width, 2 * width * d + 8 * n * d,
                         aligned))
        # A_c = G^T X: X (L2 after the first chunk), A_c float32 written
        out.append(_gemm("backward", "GEMM A_c = G^T X", "mm", width, d, n, 4 * width * d, aligned))
        out += _projection(backend, width, d, "dW_c projection", 8)
    out += _aten("backward", BACKWARD_TAIL_HEAD)
    out += _projection(backend, n, d, "dX projection", 10)
    # op.backward_core: dX times sx (float32, read and write); class rows are seen as given
    out += _aten("backward", ["mul"], 8 * n * d, what="rows seen: dX * sx")
    out += _aten("backward", ["to"], 6 * n * d, what="dX to the input dtype")
    return out


def _projection(backend, rows, d, what, per_entry):
    """The fused row projection."""
    if backend == "triton":  # triton/backward.project_rows_kernel: read A (4) and w (2), write (2)
        return [Launch("backward", f"{what} (fused kernel)", "triton:project_rows_kernel",
                       LAUNCH_GAP + 8 * rows * d / HBM, 0.0, 8 * rows * d)]
    # csrc/backward.cu project_rows, one kernel inside the op: read the float32 gradient (4) and
    # the bf16 rows (2), write the result (2 for dW, 4 for the float32 dX): `per_entry` bytes
    return [Launch("backward", "project_rows", "cuda-op:project_rows", 0.0),
            Launch("backward", f"{what}: project_rows kernel", None, LAUNCH_GAP + per_entry * rows * d / HBM, 0.0,
                   per_entry * rows * d)]


def launches(backend, n, c, d):
    """The predicted launches of one forward + backward, bf16, no sub-centres, in order."""
    fwd = _aten("forward", ENTRY) + _norm_pass("forward", n, d, "norm pass: x", True)
    fwd += _norm_pass("forward", c, d, "norm pass: w", False)
    fwd += _triton_forward(n, c, d) if backend == "triton" else _cuda_forward(n, c, d)
    fwd += _aten("forward", FORWARD_TAIL)
    return fwd + _backward(backend, n, c, d)


def probe_counts(plan, pass_):
    """Counter of what tests/launch_probe.py would record for one pass of a launch list."""
    return Counter(launch.op for launch in plan if launch.pass_ == pass_ and launch.op is not None)


def floor_seconds(n, c, d):
    return 4 * 2.0 * n * c * d / TFLOPS


def summary(backend, n, c, d):
    plan = launches(backend, n, c, d)
    groups = {}
    for launch in plan:
        if launch.op_is_parent:
            continue
        grouped = launch.name.startswith(("glue", "norm", "rows seen", "combine", "forward kernel",
                                          "grad_tile kernel"))
        key = f"{launch.pass_} {launch.name.split(':')[0] if grouped else launch.name}"
        if launch.op == "sync":
            key = f"{launch.pass_} host syncs"
        seconds, count = groups.get(key, (0.0, 0))
        groups[key] = (seconds + launch.seconds, count + 1)
    total = sum(launch.seconds for launch in plan)
    return dict(plan=plan, groups=groups, total=total, floor=floor_seconds(n, c, d),
                forward=sum(x.seconds for x in plan if x.pass_ == "forward"),
                kernels=sum(1 for x in plan if x.op != "sync" and not x.op_is_parent),
                syncs=sum(1 for x in plan if x.op == "sync"))


def table(backend, shapes=HEADLINE_SHAPES):
    lines = ["| N x C x D (bf16) | launches | host syncs | predicted fwd ms | predicted bwd ms "
             "| predicted total ms | floor ms | predicted floor ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, c, d in shapes:
        s = summary(backend, n, c, d)
        lines.append(f"| {n} x {c} x {d} | {s['kernels']} | {s['syncs']} | {1e3 * s['forward']:.2f} "
                     f"| {1e3 * (s['total'] - s['forward']):.2f} | {1e3 * s['total']:.2f} | {1e3 * s['floor']:.2f} "
                     f"| {s['floor'] / s['total']:.2f} |")
    return "\n".join(lines)


def breakdown(backend, n, c, d):
    """Where the predicted time of one shape goes, by kind of launch."""
    s = summary(backend, n, c, d)
    lines = [f"| {backend} at {n} x {c} x {d}: launch group | launches | predicted ms | share |",
             "| --- | ---: | ---: | ---: |"]
    for key, (seconds, count) in sorted(s["groups"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {key} | {count} | {1e3 * seconds:.3f} | {seconds / s['total']:.0%} |")
    return "\n".join(lines)


def report(backend):
    return "\n\n".join([f"Predicted (not measured), `{backend}` backend. Assumptions: {ASSUMPTIONS}",
                        table(backend), breakdown(backend, 4096, 262144, 512), breakdown(backend, 4096, 262144, 128)])


if __name__ == "__main__":
    for name in ("triton", "cuda"):
        print(report(name) + "\n")
