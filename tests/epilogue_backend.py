"""A test-only backend that computes the non-target epilogue by materializing its shard's N x C
block (sub_centers = 1). It lets the sharded loss's glue for the epilogue (merge_rows, the
running t, the saved threshold; arcface_kernels/distributed.py) be tested while the `torch`
backend does not compute the epilogue yet: `torch_with_epilogue` puts it in the registry in
place of "torch" (the name the sharded path takes) in the calling process only — call it in
spawned test workers, never in the pytest process — and does nothing once "torch" computes
the epilogue itself, so the same tests then run on the real backend.

It follows the backend contract (arcface_kernels/backends/contract.py) plainly: forward's
PartialStats over its classes, backward's s g (p - eps/C) dh/dc on the non-target entries and
the op's target_dcos on the target entries, through the normalization of both operands."""

import dataclasses

import torch

from arcface_kernels.backends import PartialStats, get_backend
from arcface_kernels.backends.registry import register_backend
from arcface_kernels.margins import phi
from arcface_kernels.negatives import is_hard, map_cosines, map_slope


def _cosines(x, w, labels, norms):
    dtype = norms.rx.dtype
    xn, wn = x.to(dtype) * norms.rx[:, None], w.to(dtype) * norms.rw[:, None]
    cos = xn @ wn.T
    has = labels >= 0
    is_target = torch.zeros_like(cos, dtype=torch.bool)
    is_target[has, labels[has]] = True
    return xn, wn, cos, is_target


def _logits(cos, is_target, labels, options):
    s, neg = options.scale, options.negatives
    target_cos = torch.where(labels >= 0, cos.gather(1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
    slope = torch.ones_like(cos)
    if neg is not None:
        hard = is_hard(cos, neg.threshold, is_target)
        mapped, slope = map_cosines(cos, hard, neg.coeffs), map_slope(cos, hard, neg.coeffs)
    else:
        mapped = cos
    target = phi(target_cos, options.m1, options.m2, options.m3, options.easy_margin, options.clip)
    return torch.where(is_target, s * target[:, None], s * mapped), target_cos, target, slope


def forward(x, w, labels, options, norms):
    assert options.sub_centers == 1
    _, _, cos, is_target = _cosines(x, w, labels, norms)
    z, target_cos, target, _ = _logits(cos, is_target, labels, options)
    row_max = z.amax(1)
    e = torch.exp(z - row_max[:, None])
    best_cos, best_class = cos.max(1)
    return PartialStats(row_max, e.sum(1), torch.where(labels >= 0, options.scale * target, 0.0), z.sum(1),
                        target_cos, best_cos, best_class, torch.where(is_target, 0.0, e).sum(1))


def backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype):
    xn, wn, cos, is_target = _cosines(x, w, labels, norms)
    z, _, _, slope = _logits(cos, is_target, labels, options)
    eps = options.label_smoothing / num_classes
    dcos = options.scale * grad_rows[:, None] * (torch.exp(z - lse[:, None]) - eps) * slope
    dcos = torch.where(is_target, target_dcos[:, None], dcos)
    dxn, dwn = dcos @ wn, dcos.T @ xn
    # through v / |v|: the projection off the row, times its inverse norm
    dx = norms.rx[:, None] * (dxn - (dxn * xn).sum(1, keepdim=True) * xn)
    dw = norms.rw[:, None] * (dwn - (dwn * wn).sum(1, keepdim=True) * wn)
    return dx, dw.to(dw_dtype)


def torch_with_epilogue():
    """Makes backend="torch" compute the epilogue in this process (see the module docstring)."""
    torch_backend = get_backend("torch")
    if not torch_backend.nontarget_epilogue:
        register_backend(dataclasses.replace(torch_backend, forward=forward, backward=backward,
                                             nontarget_epilogue=True))
