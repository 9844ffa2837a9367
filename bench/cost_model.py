"""Predicted cost of the `triton` backend from its real launch plan (docs/backends/triton.md):
tensor flops, HBM and L2 bytes, and a predicted H100 time per kernel. A prediction, not a
measurement: `python -m bench.gpu` replaces it the day a GPU runs.

    python -m bench.cost_model            # the markdown table of docs/backends/triton.md

Model (docs/design.md sections 6 and 9), per kernel, added up (kernels run one after another):

    time = flops / (798 TFLOP/s * tile efficiency) + exps / SFU rate + HBM bytes / 3.0 TB/s

The tile efficiency of the Triton kernels (TRITON_TILE_EFFICIENCY) and of the cuBLAS GEMMs
(CUBLAS_EFFICIENCY) are assumptions, not measurements; the epilogue's exp runs on the special
function units (16 per SM per clock, 132 SMs at 1.755 GHz) and is not overlapped with the
tensor cores (no warp specialization). The gradient tile G stays in L2 between the kernel that
writes it and the two GEMMs that read it (chunk_plan: at most 32 MiB, H100 L2 50 MB): its bytes
are L2 bytes. W is read once per pass (row blocks of one class split run together and share it
in L2). The dW tail (tangent projection, rounding cast) is one fused pass over C x D
(triton/backward.project_rows_kernel): read A_c (fp32) and w, write dW: TAIL_BYTES_PER_ENTRY.
"""

from typing import NamedTuple

import torch

from arcface_kernels.backends import chunk_plan
from arcface_kernels.backends.common import DEFAULT_WORKSPACE_BUDGET
from arcface_kernels.backends.triton.configs import CONFIGS

from .compare import HEADLINE_SHAPES
from .cost_model_cuda import HBM, TFLOPS, floor_seconds, predict  # one model of rates, passes and the floor

SFU = 16 * 132 * 1.755e9  # exp / s
TRITON_TILE_EFFICIENCY = 0.75  # assumed fraction of the tensor rate a Triton wgmma mainloop reaches
CUBLAS_EFFICIENCY = 0.80  # assumed for the chunk GEMMs (K = chunk width >= 4096 at the headline shapes)
BF16, F32 = 2, 4
# the fused projection per C x D entry: read A_c (4) and w (2), write dW (2). As torch
# element-wise ops (chunk_plan.project_rows) it would be about 64 (fp32 temporaries).
TAIL_BYTES_PER_ENTRY = F32 + BF16 + BF16
UNFUSED_TAIL_BYTES_PER_ENTRY = 64
PROGRAMS_PER_SM, SMS = 4, 132


class Kernel(NamedTuple):
    name: str
    pass_: str  # "forward" or "backward"
    flops: float
    efficiency: float
    exps: float
    hbm_bytes: float
    l2_bytes: float

    def seconds(self, gemm_efficiency=1.0):
        """Predicted seconds; gemm_efficiency scales every tensor efficiency (a what-if)."""
        tensor = self.flops / (TFLOPS * self.efficiency * gemm_efficiency) if self.flops else 0.0
        return tensor + self.exps / SFU + self.hbm_bytes / HBM


def triton_plan(n, c, d, budget=DEFAULT_WORKSPACE_BUDGET):
    """The kernels of one forward + backward at (N, C, D) in bf16, from the real configs and sizing."""
    nc, mm = n * c, 2.0 * n * c * d
    fwd = CONFIGS["forward"]
    row_blocks = -(-n // fwd.block_m)
    splits = max(1, min(-(-PROGRAMS_PER_SM * SMS // row_blocks), -(-c // fwd.block_n)))
    step = chunk_plan.chunk_classes(n, c, 1, d, torch.bfloat16, budget, CONFIGS["grad_tile"].block_n)
    n_chunks = -(-c // step)
    b_traffic = 3 * F32 * n * d * n_chunks  # B read, and the fp32 result of addmm(out_dtype) written + copied
    return [
        Kernel("forward: cosines + margin + online softmax", "forward", mm, TRITON_TILE_EFFICIENCY, nc,
               BF16 * c * d + BF16 * n * d * splits, 0.0),
        Kernel("grad tile: recompute + dcos -> G", "backward", mm, TRITON_TILE_EFFICIENCY, nc,
               BF16 * c * d + BF16 * n * d * n_chunks, BF16 * nc),
        Kernel("GEMM B += G W_c", "backward", mm, CUBLAS_EFFICIENCY, 0.0, BF16 * c * d + b_traffic, BF16 * nc),
        Kernel("GEMM A_c = G^T X", "backward", mm, CUBLAS_EFFICIENCY, 0.0,
               BF16 * n * d * n_chunks + F32 * c * d, BF16 * nc),
        Kernel("dW tail: fused projection", "backward", 0.0, 1.0, 0.0, TAIL_BYTES_PER_ENTRY * c * d, 0.0),
        Kernel("dX projection (fused)", "backward", 0.0, 1.0, 0.0, (F32 + BF16 + F32) * n * d, 0.0),
    ], n_chunks


def table(shapes=HEADLINE_SHAPES):
    lines = [
        "| N x C x D (bf16) | tensor flops (x 2NCD) | chunks | HBM GB | L2 GB | predicted fwd ms "
        "| predicted bwd ms | predicted total ms | floor ms | predicted floor ratio "
        "| predicted ratio with the dW tail in torch ops |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, c, d in shapes:
        plan, n_chunks = triton_plan(n, c, d)
        now = predict(plan)
        unfused = now["total"] + (UNFUSED_TAIL_BYTES_PER_ENTRY - TAIL_BYTES_PER_ENTRY) * c * d / HBM
        floor = floor_seconds(n, c, d)
        flops = sum(k.flops for k in plan) / (2.0 * n * c * d)
        hbm = sum(k.hbm_bytes for k in plan) / 1e9
        l2 = sum(k.l2_bytes for k in plan) / 1e9
        lines.append(
            f"| {n} x {c} x {d} | {flops:.0f} | {n_chunks} | {hbm:.1f} | {l2:.1f} | {1e3 * now['forward']:.2f} "
            f"| {1e3 * now['backward']:.2f} | {1e3 * now['total']:.2f} | {1e3 * floor:.2f} "
            f"| {floor / now['total']:.2f} | {floor / unfused:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
