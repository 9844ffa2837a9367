"""The `cuda` backend's Python side (backends/cuda.py) on the CPU: CPU stand-ins for the
extension's two ops, written from their contracts in csrc/ops.h, replace the CUDA kernels, so the
argument order, the chunk walk and the normalization terms are checked against the float64
`torch` backend without a GPU. (The kernels' own math is checked on the host by
test_cuda_math_host.py; the kernels themselves on a GPU by test_backends.py.)"""

import importlib

import pytest
import torch

from arcface_kernels import op
from arcface_kernels.backends import RowNorms, chunk_plan, row_norms, workspace_budget
from arcface_kernels.backends import chunked as torch_backend
from arcface_kernels.options import LossOptions
from helpers import make_problem, rel_err

cuda_backend = importlib.import_module("arcface_kernels.backends.cuda")
pytestmark = pytest.mark.skipif(cuda_backend.BUILT_FOR is None, reason="the CUDA extension is not built")


def _options(scale, sub_centers, easy_margin, m1, m2, m3, **settings):
    return LossOptions(scale=scale, sub_centers=sub_centers, easy_margin=easy_margin, **settings).replace(
        m1=m1, m2=m2, m3=m3)


def partial_stats(x, w, labels, m1, m2, m3, rx, rw, scale, sub_centers, easy_margin, workspace_bytes):
    """csrc/ops.h partial_stats: the statistics over all classes of w (any chunking gives them)."""
    # the CUDA op always sums the logits; the torch backend only where smoothing reads the sum:
    # a nonzero smoothing (which changes no other statistic) asks it to
    options = _options(scale, sub_centers, easy_margin, m1, m2, m3, label_smoothing=0.5)
    return list(torch_backend.forward(x, w, labels, options, RowNorms(rx, rw)))


def grad_chunk(x, w_rows, labels, rx, rw_rows, lse, grad_rows, target_dcos, out, first_class, scale, sub_centers,
               smoothing_per_class):
    """csrc/ops.h grad_chunk: out = dcos * rx * rw^T for the weight rows of classes
    [first_class, first_class + len(w_rows) / K), each class's dcos on its winning sub-centre:
    s g (p - eps / C) off the target, target_dcos on it."""
    n, k = x.shape[0], sub_centers
    cos = ((x.float() @ w_rows.float().T) * rx[:, None] * rw_rows[None, :]).view(n, -1, k)
    cos, pick = cos.max(2)
    target = labels - first_class
    is_target = torch.zeros_like(cos, dtype=torch.bool)
    inside = (labels >= 0) & (target >= 0) & (target < cos.shape[1])
    is_target[inside, target[inside]] = True
    others = scale * grad_rows[:, None] * (torch.exp(scale * cos - lse[:, None]) - smoothing_per_class)
    dcos = torch.where(is_target, target_dcos[:, None], others)
    routed = torch.zeros(n, cos.shape[1], k).scatter_(2, pick[..., None], dcos[..., None]).view(n, -1)
    out.copy_(routed * rx[:, None] * rw_rows[None, :])


@pytest.fixture(scope="module")
def cpu_ops():
    library = torch.library.Library("arcface_kernels_cuda", "IMPL")
    library.impl("partial_stats", partial_stats, "CPU")
    library.impl("grad_chunk", grad_chunk, "CPU")
    yield
    library._destroy()


@pytest.mark.parametrize("k,settings,dtype", [
    (1, {}, torch.float32),
    (3, dict(label_smoothing=0.1), torch.float32),
    (1, dict(easy_margin=True, margin_grad="straight_through"), torch.float32),
    (2, dict(m1=1.35, m2=0.0), torch.float32),
    (1, {}, torch.float16),  # bfloat16 gradient tiles (chunk_plan.gradient_dtype)
])
def test_cuda_backend_glue_matches_the_torch_backend(cpu_ops, k, settings, dtype):
    x, w, y = make_problem(9, 37, 16, k=k, seed=k, dtype=dtype)
    labels = y.clone()
    labels[2] = -1  # ignored row
    n, num_classes = x.shape[0], w.shape[0] // k
    options = LossOptions(sub_centers=k, **settings)
    settings_64 = options.for_rows(n, x.device, torch.float64)
    options = options.for_rows(n, x.device, torch.float32)
    norms, norms_64 = row_norms(x, w), row_norms(x.double(), w.double())
    with workspace_budget(n * k * 6 * 5):  # a few classes per chunk: the walk crosses many chunks
        stats = cuda_backend.forward(x, w, labels, options, norms)
    ref_stats = torch_backend.forward(x.double(), w.double(), labels, settings_64, norms_64)
    for name, out, ref in zip(stats._fields, stats, ref_stats):
        if name == "logit_sum" and not options.label_smoothing:
            continue  # read only with label smoothing: the torch backend leaves it 0 otherwise
        assert rel_err(out, ref) < 1e-5, name
    active = labels >= 0
    _, lse, gap = op.finalize(ref_stats, active, settings_64.label_smoothing, num_classes)
    grad_rows = torch.where(active, torch.linspace(0.5, 1.5, n, dtype=torch.float64), 0.0)
    target_dcos = grad_rows * op.target_cosine_gradient(gap, ref_stats.target_cos, active, settings_64, num_classes)
    with workspace_budget(n * k * 6 * 5):
        dx, dw = cuda_backend.backward(grad_rows.float(), x, w, labels, lse.float(), target_dcos.float(), options,
                                       num_classes, norms, w.dtype)
    ref_dx, ref_dw = torch_backend.backward(grad_rows, x.double(), w.double(), labels, lse, target_dcos, settings_64,
                                            num_classes, norms_64, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert dx.dtype == torch.float32 and dw.dtype == w.dtype
    assert rel_err(dx, ref_dx) < tol
    assert rel_err(dw, ref_dw) < tol


def test_backward_chunk_with_its_float32_dots_fits_the_budget():
    for n, d, budget in ((4096, 512, 64 * 2**20), (512, 128, 2**20), (7, 16, 5000)):
        with workspace_budget(budget):
            for dtype in (torch.bfloat16, torch.float32):
                classes = chunk_plan.chunk_classes(n, 10**7, 1, d, dtype, cuda_backend.backward_budget(n, d, dtype))
                per_class = chunk_plan.workspace_bytes_per_row(n, d, dtype) + 4 * n  # + grad_chunk's dots
                assert classes * per_class <= budget
                assert (classes + 2) * per_class > budget  # and uses most of it
