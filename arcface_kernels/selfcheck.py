"""The self-check of `python -m arcface_kernels` (and `python -m bench.gpu`): one backend, one
dtype, against the float64 reference on the same rounded inputs, at a size where the bugs a
kernel can have show up.

The problem (N, C, D) = (300, 5003, 192) with ArcFace margins (s = 64, m2 = 0.5) and a 2 MiB
workspace budget, so that the backward walks several class chunks (and the forward several
class splits). Every row lies near its class centre (cosine 0.55-0.85 to it, about 45 degrees):
there dphi/dc = sin(theta + m) / sin(theta) is far from 1 and the target's softmax probability
is far from 1, so the target entry's gradient s (p_y - 1) dphi/dc is large, and each class split
holds a sizeable part of the softmax mass. Compared: the loss, every row's lse, dX and dW, each
as a relative error (norm of the difference over the norm of the reference) within TOLERANCE.
"""

import torch

from .api import margin_softmax_loss
from .backends import workspace_budget

SHAPE = (300, 5003, 192)
BUDGET = 2 * 2**20
MARGINS = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
# the cosine of a row to its own class centre is drawn uniformly in this range
TARGET_COS = (0.55, 0.85)


def problem(shape=SHAPE, dtype=torch.float32, seed=0):
    """x (N, D), w (C, D) rounded to dtype (on the CPU) and labels: every row near its class centre."""
    n, c, d = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, c, (n,), generator=g)
    # x = cos * w_y + sin * u with u a unit vector orthogonal to w_y: cos(x, w_y) = cos exactly
    cos = TARGET_COS[0] + (TARGET_COS[1] - TARGET_COS[0]) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(u - (u * w[y]).sum(1, keepdim=True) * w[y], dim=1)
    x = (cos * w[y] + (1 - cos**2).sqrt() * u) * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    return x.to(dtype), w.to(dtype), y


def _run(backend, x, w, y):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, stats = margin_softmax_loss(x, w, y, backend=backend, return_stats=True, **MARGINS)
    loss.backward()
    return [t.detach().double().cpu() for t in (loss, stats.lse, x.grad, w.grad)]


def errors(backend, device, dtype=torch.float32, shape=SHAPE, seed=0):
    """{"loss", "lse", "dX", "dW"}: relative errors of the backend against the float64 reference on
    the same dtype-rounded inputs."""
    x, w, y = problem(shape, dtype, seed)
    device = torch.device(device)
    with workspace_budget(BUDGET):
        got = _run(backend, x.to(device), w.to(device), y.to(device))
    want = _run("reference", x.double(), w.double(), y)
    return {name: float((a - b).norm() / b.norm()) for name, a, b in zip(("loss", "lse", "dX", "dW"), got, want)}


def check(backend, device, dtype=torch.float32, shape=SHAPE):
    """(passed, errors): every relative error within TOLERANCE[dtype]."""
    errs = errors(backend, device, dtype, shape)
    return max(errs.values()) <= TOLERANCE[dtype], errs
