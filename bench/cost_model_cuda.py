"""Predicted cost of the `cuda` backend from its launch plan (docs/backends/cuda.md): tensor flops,
bytes through HBM and a roofline time per kernel, summed over the chunk walk. A prediction, not
a measurement: it is replaced by `python -m bench.compare` the day a GPU runs it.

    python -m bench.cost_model_cuda          # the markdown table of docs/backends/cuda.md

Model (docs/design.md section 6): each kernel takes max(flops / F, bytes / B) with F the bf16
tensor rate (798 TFLOP/s, an H100; the floor is 4 x 2NCD at the same rate) and B the HBM rate
(3.0 TB/s); kernels run one after another. Counted HBM bytes per N x C entry come from the kernels
(csrc/): a chunk's float32 dots are written by the GEMM and read by the epilogue (the 64 MiB dots
tile is larger than the 50 MB L2); the bf16 gradient tile G (the shared backward plan's buffer,
sized by chunk_plan.chunk_classes within the workspace budget, at most 32 MiB) is written once
and read by the two gradient GEMMs from L2.
O(C D) and O(N D) traffic (weights, dW, dX) is counted too; O(N) and O(C) is not.
"""

from typing import NamedTuple

import torch

from arcface_kernels.backends import chunk_plan
from arcface_kernels.backends import cuda as cuda_backend

from .compare import HEADLINE_SHAPES

TFLOPS = 798e12  # bf16 dense tensor rate (H100), also the floor's rate
HBM = 3.0e12  # bytes / s
BF16 = 2
F32 = 4
DOTS_BYTES = 64 * 2**20  # the v1 float32 dots tile (the default workspace budget)


class Kernel(NamedTuple):
    name: str
    pass_: str  # "forward" or "backward"
    flops: float
    bytes: float

    def seconds(self, gemm_efficiency=1.0):
        return max(self.flops / (TFLOPS * gemm_efficiency), self.bytes / HBM)


def chunks(n, c, tile_bytes, entry_bytes):
    """How many class chunks a walk takes when an N x chunk tile of entry_bytes entries fits tile_bytes."""
    per_chunk = max(1, tile_bytes // (entry_bytes * n))
    return -(-c // per_chunk)


def cuda_v2_plan(n, c, d, itemsize=BF16):
    """The kernels of one forward + backward of this version, totalled over the chunk walk."""
    nc, mm = n * c, 2.0 * n * c * d
    # B (N x D, fp32) is read and written by every chunk's GEMM (beta = 1); chunks as the backend sizes them
    per_chunk = chunk_plan.chunk_classes(n, c, 1, d, torch.bfloat16, cuda_backend.backward_budget(n, d, torch.bfloat16))
    b_traffic = 2 * F32 * n * d * -(-c // per_chunk)
    return [
        Kernel("GEMM dots (fp32 out)", "forward", mm, F32 * nc + itemsize * c * d),
        Kernel("segment_stats epilogue", "forward", 0.0, F32 * nc),
        Kernel("GEMM recompute dots (fp32 out)", "backward", mm, F32 * nc + itemsize * c * d),
        Kernel("gradient_tile epilogue: G", "backward", 0.0, F32 * nc + BF16 * nc),
        Kernel("GEMM B += G W_c (fp32)", "backward", mm, itemsize * c * d + b_traffic),
        Kernel("GEMM A_c = G^T X, dW tail", "backward", mm, (F32 + F32 + itemsize + itemsize) * c * d),
        Kernel("dX projection", "backward", 0.0, (F32 + F32 + itemsize) * n * d),
    ]


def cuda_v1_plan(n, c, d, itemsize=BF16):
    """The previous version (one block per row, two-pass forward epilogue, row and column sums of
    dcos * cos over the tile, an in-place product write), for the predicted gain."""
    nc, mm = n * c, 2.0 * n * c * d
    # dX: each chunk's fp32 product written, then added (read twice, written once)
    dx_traffic = 4 * F32 * n * d * chunks(n, c, DOTS_BYTES, F32)
    return [
        Kernel("GEMM dots (fp32 out)", "forward", mm, F32 * nc + itemsize * c * d),
        Kernel("forward epilogue (two passes)", "forward", 0.0, 2 * F32 * nc),
        Kernel("GEMM recompute dots", "backward", mm, F32 * nc + itemsize * c * d),
        Kernel("backward epilogue: G + dcos*cos in place", "backward", 0.0, F32 * nc + BF16 * nc + F32 * nc),
        Kernel("row sum", "backward", 0.0, F32 * nc),
        Kernel("column sum", "backward", 0.0, F32 * nc),
        Kernel("GEMM G W_c + add into dX", "backward", mm, BF16 * nc + itemsize * c * d + dx_traffic),
        Kernel("GEMM G^T X + 7-op dW tail", "backward", mm, BF16 * nc + 7 * F32 * c * d),
    ]


def predict(plan, gemm_efficiency=1.0):
    """Predicted seconds per pass: {"forward", "backward", "total"}."""
    times = {"forward": 0.0, "backward": 0.0}
    for kernel in plan:
        times[kernel.pass_] += kernel.seconds(gemm_efficiency)
    times["total"] = times["forward"] + times["backward"]
    return times


def floor_seconds(n, c, d):
    return 4 * 2.0 * n * c * d / TFLOPS


def table(shapes=HEADLINE_SHAPES):
    lines = [
        "| N x C x D (bf16) | tensor flops (x 2NCD) | HBM GB | predicted fwd ms | predicted bwd ms "
        "| predicted total ms | floor ms at 798 TFLOP/s | predicted floor ratio "
        "| predicted floor ratio, GEMMs at 70 % | v1 predicted total ms "
        "| v1 predicted floor ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, c, d in shapes:
        plan = cuda_v2_plan(n, c, d)
        now, slow, old = predict(plan), predict(plan, 0.7), predict(cuda_v1_plan(n, c, d))
        floor = floor_seconds(n, c, d)
        flops = sum(k.flops for k in plan) / (2.0 * n * c * d)
        gb = sum(k.bytes for k in plan) / 1e9
        lines.append(
            f"| {n} x {c} x {d} | {flops:.0f} | {gb:.1f} | {1e3 * now['forward']:.2f} | {1e3 * now['backward']:.2f} "
            f"| {1e3 * now['total']:.2f} | {1e3 * floor:.2f} | {floor / now['total']:.2f} "
            f"| {floor / slow['total']:.2f} | {1e3 * old['total']:.2f} | {floor / old['total']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
