"""Every public entry path of the loss, as one callable each, and the edge-case problems they are
all checked on (tests/test_entry_paths.py; the sharded paths run inside gloo ranks).

A path builds, from the class rows w and the options, a loss function loss(x, y, return_stats)
(the functional op bound to w, or a head holding w) and the weight leaf whose .grad the caller
reads; `run` makes one call. Every path computes the loss over all C classes (Partial FC keeps every class:
sample_rate 0.999 of C < 1000 classes rounds up to C), so each is compared with the same float64
formula (float64_oracle.py, which shares no code with the package).
"""

import torch

import arcface_kernels as ak

# Partial FC keeps ceil(rate * C) classes: every class for C < 1000, through the sampling code.
KEEP_EVERY_CLASS = 0.999
HEAD_SETTINGS = ("scale", "m1", "m2", "m3", "sub_centers", "easy_margin", "margin_grad", "label_smoothing",
                 "ignore_index", "reduction")


def op_path(backend):
    def build(w, options):
        w = w.detach().clone().requires_grad_(True)

        def loss(x, y, return_stats=False):
            return ak.margin_softmax_loss(x, w, y, backend=backend, return_stats=return_stats, **options)
        return loss, w
    return build


def _head(w, options, sample_rate, backend="torch"):
    settings = {name: value for name, value in options.items() if name in HEAD_SETTINGS}
    k = settings.get("sub_centers", 1)
    head = ak.CombinedMarginLoss(w.shape[0] // k, w.shape[1], sample_rate=sample_rate, backend=backend,
                                 dtype=w.dtype, **settings)
    with torch.no_grad():
        head.weight.copy_(w)
    return head


def head_path(sample_rate):
    def build(w, options):
        head = _head(w, options, sample_rate)
        return head, head.weight
    return build


SINGLE_PROCESS_PATHS = {
    "op-reference": op_path("reference"),
    "head": head_path(1.0),
    "partial_fc": head_path(KEEP_EVERY_CLASS),
}


def run(build, x, w, y, options, return_stats=False):
    """(output, x leaf, weight leaf) of one call through a path."""
    loss_fn, w_leaf = build(w, options)
    x = x.detach().clone().requires_grad_(True)
    return loss_fn(x, y, return_stats=return_stats), x, w_leaf


# -- the problems ---------------------------------------------------------------------------------

def _random(n, c, d, k=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return x.to(dtype), w.to(dtype), y


def huge_and_tiny_rows():
    """Rows whose entries reach 1e38 (their squares overflow float32) and rows of norm 1e-30
    (below eps: cos = 0), in embeddings and in the weight."""
    x, w, y = _random(6, 7, 5, seed=1)
    x[0] *= 1e38 / x[0].abs().max()
    x[1] *= 1e-30
    w[2] *= 3e38 / w[2].abs().max()
    w[3] *= 1e-30
    y[4] = 2
    return x, w, y, {}


def confident_rows():
    """Every row 0.6 rad from its class centre and nearly orthogonal to the others (orthonormal
    centres): losses around 1e-11, where the target gradient p_y - 1 must not be quantized to
    ulp(lse) and the loss must keep its relative precision."""
    n, c, d = 8, 12, 32
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    w, outside = basis[:c] * 3.0, basis[c:]
    y = torch.randint(0, c, (n,), generator=g)
    u = torch.nn.functional.normalize(torch.randn(n, d - c, generator=g, dtype=torch.float64) @ outside, dim=1)
    x = 0.8253 * basis[y] + 0.5646 * u + 0.02 * torch.randn(n, c, generator=g, dtype=torch.float64) @ basis[:c]
    return x.float(), w.float(), y, {"scale": 64.0}


def ignored_and_uint8_labels():
    """uint8 labels: 156 is a class (not ignore_index=-100 modulo 256); with ignore_index=7 the
    rows labelled 7 are ignored. 160 classes."""
    x, w, _ = _random(5, 160, 4, seed=4)
    y = torch.tensor([156, 3, 7, 7, 159], dtype=torch.uint8)
    return x, w, y, {"ignore_index": 7}


def uint8_label_156():
    x, w, _ = _random(2, 160, 4, seed=5)
    return x, w, torch.tensor([156, 3], dtype=torch.uint8), {}


def sub_centers_and_margins():
    x, w, y = _random(7, 5, 6, k=3, seed=6)
    y[2] = -100
    return x, w, y, {"sub_centers": 3, "m1": 1.2, "m2": 0.3, "m3": 0.1, "label_smoothing": 0.1}


def empty_batch_with_sub_centers():
    x, w, y = _random(0, 5, 6, k=2, seed=7)
    return x, w, y, {"sub_centers": 2}


CASES = {
    "huge_and_tiny_rows": huge_and_tiny_rows,
    "confident_rows": confident_rows,
    "ignored_and_uint8_labels": ignored_and_uint8_labels,
    "uint8_label_156": uint8_label_156,
    "sub_centers_and_margins": sub_centers_and_margins,
    "empty_batch_with_sub_centers": empty_batch_with_sub_centers,
}
# relative-norm tolerances of loss, dX, dW against the float64 formula (float32 inputs)
# Confident rows: float32 cosines (about 1e-7 off) move each z by s * 1e-7 and the tiny exp(z_j - z_y)
# by as much relatively; all paths land near 1e-4 (the quantized p_y - 1 gave 0.8).
TOLERANCE = {"confident_rows": 5e-4}
DEFAULT_TOLERANCE = 1e-4


def oracle_options(options):
    """The oracle's names for the options (k, eps)."""
    renamed = {"sub_centers": "k", "label_smoothing": "eps"}
    return {renamed.get(name, name): value for name, value in options.items()}


def relative_error(out, ref):
    out, ref = out.double(), ref.double()
    scale = ref.norm()
    return float((out - ref).norm() / scale) if scale > 0 else float(out.norm())


def mismatches(loss, dx, dw, ref, tol):
    """The (name, error) pairs of loss, dX and dW that miss the reference by more than tol."""
    bad = []
    for name, value, expected in zip(("loss", "dX", "dW"), (loss, dx, dw), ref):
        if value is None:
            value = torch.zeros_like(expected)
        if not torch.isfinite(value).all():
            bad.append((name, "non-finite"))
            continue
        err = relative_error(value, expected)
        if not err <= tol:
            bad.append((name, err))
    return bad
