"""What a user would otherwise use: each implementation is a loss function
(x, w, labels, spec) -> scalar loss, where spec holds scale and margins.

Formulas written from the public descriptions of each head (no code copied)."""

import torch
import torch.nn.functional as F

import arcface_kernels as ak
from arcface_kernels.backends import FUSED_BACKEND_NAMES, backend_status


def ours(backend):
    def loss(x, w, y, spec):
        return ak.margin_softmax_loss(x, w, y, scale=spec["scale"], m1=spec["m1"], m2=spec["m2"], m3=spec["m3"],
                                      backend=backend)

    return loss


def insightface_style(x, w, y, spec):
    """insightface arcface_torch's CombinedMarginLoss: full cosine logits, then in place and
    without autograd arccos, margin on the target, cos back; the margin's gradient is
    straight-through."""
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    rows = torch.arange(len(y), device=y.device)
    target = logits[rows, y]
    with torch.no_grad():
        logits.arccos_()
        logits[rows, y] = spec["m1"] * target.arccos() + spec["m2"]
        logits.cos_()
        logits[rows, y] -= spec["m3"]
    return F.cross_entropy(logits * spec["scale"], y)


def pml_style(x, w, y, spec):
    """pytorch-metric-learning's ArcFaceLoss formula: cosine matrix, the target's modified cosine
    added as a one-hot difference, scaled cross entropy (autograd through acos)."""
    cosine = F.linear(F.normalize(x), F.normalize(w))
    mask = F.one_hot(y, w.shape[0]).to(cosine.dtype)
    target = cosine[torch.arange(len(y), device=y.device), y].clamp(-1 + 1e-7, 1 - 1e-7)
    modified = torch.cos(spec["m1"] * torch.acos(target) + spec["m2"]) - spec["m3"]
    logits = cosine + mask * (modified - target)[:, None]
    return F.cross_entropy(logits * spec["scale"], y)


def compiled_reference():
    return torch.compile(ours("reference"))


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy

    def loss(x, w, y, spec):
        # plain normalized softmax: the scale folded into the normalized embeddings
        return linear_cross_entropy(spec["scale"] * F.normalize(x), F.normalize(w), y)

    return loss


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()

    def loss(x, w, y, spec):
        return module(F.normalize(w), spec["scale"] * F.normalize(x), y)

    return loss


def implementations(device, plain_softmax):
    """(name, loss function or the reason it is missing). Peers for the fused linear cross
    entropy only take part without a margin (m1=1, m2=m3=0)."""
    impls = [("eager reference", ours("reference")), ("insightface-style", insightface_style),
             ("pml-style", pml_style), ("torch.compile(reference)", compiled_reference())]
    for name in FUSED_BACKEND_NAMES:
        ok, reason = backend_status(name, device)
        impls.append((f"arcface_kernels[{name}]", ours(name) if ok else f"unavailable: {reason}"))
    if plain_softmax:
        for name, make in (("cut-cross-entropy", _cut_cross_entropy), ("liger-kernel FLCE", _liger)):
            try:
                impls.append((name, make()))
            except ImportError:
                impls.append((name, "not installed"))
    return impls


def floor_ms(n, c, d, tflops):
    """4 matmuls of 2NCD flops (forward, recompute, dX, dW) at the measured rate."""
    return 4 * 2 * n * c * d / (tflops * 1e12) * 1e3


def is_plain_softmax(spec):
    return spec["m1"] == 1.0 and spec["m2"] == 0.0 and spec["m3"] == 0.0
