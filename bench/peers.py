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


def insightface_style_in(dtype):
    """The insightface-style head with its logits in `dtype` (bf16 as arcface_torch trains under
    autocast, or fp32); gradients flow back to the inputs in their own dtype."""

    def loss(x, w, y, spec):
        return insightface_style(x.to(dtype), w.to(dtype), y, spec)

    return loss


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


def _linear_cross_entropy(**chunking):
    """torch's own F.linear_cross_entropy (torch >= 2.14) on the normalized, scaled inputs: no
    margin. With `chunking`, its chunked path (torch.nn.LinearCrossEntropyOptions(**chunking): the
    batch in chunks, gradients computed in forward); without, its reference path."""
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy with options")
    options = torch.nn.LinearCrossEntropyOptions(**chunking) if chunking else None

    def loss(x, w, y, spec):
        return F.linear_cross_entropy(spec["scale"] * F.normalize(x), F.normalize(w), y, options=options)

    return loss


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


# Peers from other packages, shown as "not installed" where absent.
THIRD_PARTY = ("cut-cross-entropy", "liger-kernel FLCE")


def implementations(device, plain_softmax):
    """(name, loss function or the reason it is missing). Peers for the fused linear cross
    entropy only take part without a margin (m1=1, m2=m3=0)."""
    impls = [("eager reference", ours("reference")),
             ("insightface-style (fp32)", insightface_style_in(torch.float32)),
             ("insightface-style (bf16)", insightface_style_in(torch.bfloat16)),
             ("pml-style", pml_style), ("torch.compile(reference)", compiled_reference())]
    for name in FUSED_BACKEND_NAMES:
        ok, reason = backend_status(name, device)
        impls.append((f"arcface_kernels[{name}]", ours(name) if ok else f"unavailable: {reason}"))
    if plain_softmax:
        for name, chunking in (("F.linear_cross_entropy", {}),
                               ("F.linear_cross_entropy chunked (auto)", dict(chunking_method="auto")),
                               ("F.linear_cross_entropy chunked (aspect_ratio:4)",
                                dict(chunking_method="aspect_ratio:4"))):
            try:
                impls.append((name, _linear_cross_entropy(**chunking)))
            except ImportError as err:
                impls.append((name, f"absent: {err}"))
        for name, make in zip(THIRD_PARTY, (_cut_cross_entropy, _liger)):
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
