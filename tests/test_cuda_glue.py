"""The `cuda` backend's Python side (backends/cuda.py) on the CPU: CPU stand-ins for the
extension's ops, written from their contracts in csrc/ops.h, replace the CUDA kernels, so the
argument order, the chunk walk and the normalization terms are checked against the float64
`torch` backend without a GPU. (The kernels' own math is checked on the host by
test_cuda_math_host.py; the kernels themselves on a GPU by test_backends.py.)"""

import importlib

import pytest
import torch

from arcface_kernels import op
from arcface_kernels.backends import RowNorms, chunk_plan, registry, row_norms, workspace_budget
from arcface_kernels.backends import chunked as torch_backend
from arcface_kernels.margins import phi
from arcface_kernels.negatives import is_hard, map_cosines, map_slope
from arcface_kernels.options import LossOptions
from helpers import make_problem, rel_err

cuda_backend = importlib.import_module("arcface_kernels.backends.cuda")
pytestmark = pytest.mark.skipif(cuda_backend.BUILT_FOR is None, reason="the CUDA extension is not built")


def _options(scale, sub_centers, easy_margin, m1, m2, m3, **settings):
    return LossOptions(scale=scale, sub_centers=sub_centers, easy_margin=easy_margin, **settings).replace(
        m1=m1, m2=m2, m3=m3)


CALLS = []  # (op, details) of every call of the stand-ins below


def _chunk_cosines(x, w_rows, labels, rx, rw_rows, first_class, k):
    """Class cosines of a chunk (max over the K sub-centres), the winning column, the target mask."""
    n = x.shape[0]
    cos = ((x.float() @ w_rows.float().T) * rx[:, None] * rw_rows[None, :]).view(n, -1, k)
    cos, pick = cos.max(2)
    target = labels - first_class
    is_target = torch.zeros_like(cos, dtype=torch.bool)
    inside = (labels >= 0) & (target >= 0) & (target < cos.shape[1])
    is_target[inside, target[inside]] = True
    return cos, pick, is_target


def _remapped_stats(x, w, labels, m1, m2, m3, rx, rw, scale, k, easy_margin, clip_eps, threshold, coeffs):
    """partial_stats' statistics with the non-target epilogue: hard non-target logits s h(c) (eq. (N1))."""
    cos, _, is_target = _chunk_cosines(x, w, labels, rx, rw, 0, k)
    has_target = labels >= 0
    cos_y = cos.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    margined = phi(cos_y, m1, m2, m3, easy_margin, clip=clip_eps)
    z = scale * torch.where(is_target, margined[:, None], map_cosines(cos, is_hard(cos, threshold, is_target), coeffs))
    row_max = z.max(1).values
    e = torch.exp(z - row_max[:, None])
    best_cos, best_class = cos.max(1)
    return [row_max, e.sum(1), torch.where(has_target, scale * margined, 0.0), z.sum(1),
            torch.where(has_target, cos_y, 0.0), best_cos, best_class, torch.where(is_target, 0.0, e).sum(1)]


def partial_stats(x, w, labels, m1, m2, m3, rx, rw, scale, sub_centers, easy_margin, clip_eps, threshold, coeffs,
                  workspace_bytes):
    """csrc/ops.h partial_stats: the statistics over all classes of w (any chunking gives them);
    clip_eps: the clip rule; threshold, coeffs: the non-target epilogue."""
    CALLS.append(("partial_stats", (clip_eps, threshold is not None, coeffs is not None)))
    if threshold is not None:
        return _remapped_stats(x, w, labels, m1, m2, m3, rx, rw, scale, sub_centers, easy_margin, clip_eps,
                               threshold, coeffs)
    # the CUDA op always sums the logits; the torch backend only where smoothing reads the sum:
    # a nonzero smoothing (which changes no other statistic) asks it to
    clip = {} if clip_eps is None else dict(fallback="clip", clip_eps=clip_eps)
    options = _options(scale, sub_centers, easy_margin, m1, m2, m3, label_smoothing=0.5, **clip)
    return list(torch_backend.forward(x, w, labels, options, RowNorms(rx, rw)))


def grad_chunk(x, w_rows, labels, rx, rw_rows, lse, grad_rows, target_dcos, out, first_class, scale, sub_centers,
               smoothing_per_class, threshold, coeffs):
    """csrc/ops.h grad_chunk: out = dcos * rx * rw^T for the weight rows of classes
    [first_class, first_class + len(w_rows) / K), each class's dcos on its winning sub-centre:
    s g (p - eps / C) off the target, target_dcos on it; with threshold and coeffs, s g (p - eps / C)
    dh/dc with p = exp(s h(c) - lse) on the hard entries (eq. (N2))."""
    n, k = x.shape[0], sub_centers
    cos, pick, is_target = _chunk_cosines(x, w_rows, labels, rx, rw_rows, first_class, k)
    mapped, slope = cos, 1.0
    if threshold is not None:
        hard = is_hard(cos, threshold, is_target)
        mapped, slope = map_cosines(cos, hard, coeffs), map_slope(cos, hard, coeffs)
    others = scale * grad_rows[:, None] * (torch.exp(scale * mapped - lse[:, None]) - smoothing_per_class) * slope
    dcos = torch.where(is_target, target_dcos[:, None], others)
    routed = torch.zeros(n, cos.shape[1], k).scatter_(2, pick[..., None], dcos[..., None]).view(n, -1)
    out.copy_(routed * rx[:, None] * rw_rows[None, :])


def recorded_grad_chunk(x, w_rows, labels, rx, rw_rows, lse, grad_rows, target_dcos, out, first_class, scale,
                        sub_centers, smoothing_per_class, threshold, coeffs):
    CALLS.append(("grad_chunk", (first_class, w_rows.shape[0], out.stride(0) * out.element_size())))
    CALLS.append(("grad_chunk negatives", (threshold is not None, coeffs is not None)))
    grad_chunk(x, w_rows, labels, rx, rw_rows, lse, grad_rows, target_dcos, out, first_class, scale, sub_centers,
               smoothing_per_class, threshold, coeffs)


def project_rows(grad, v, factor, out):
    """csrc/ops.h project_rows: out = grad - (u . grad) u per row, u = factor * v, from float32 grad,
    rounded once into out's dtype."""
    CALLS.append(("project_rows", (grad.dtype, v.dtype, out.dtype, grad.shape[0])))
    unit = v.float() * factor[:, None]
    out.copy_(grad - (unit * grad).sum(1)[:, None] * unit)


@pytest.fixture(scope="module")
def cpu_ops():
    library = torch.library.Library("arcface_kernels_cuda", "IMPL")
    library.impl("partial_stats", partial_stats, "CPU")
    library.impl("grad_chunk", recorded_grad_chunk, "CPU")
    library.impl("project_rows", project_rows, "CPU")
    yield
    library._destroy()


def _backward_inputs(stats, labels, settings, num_classes):
    """(grad_rows, lse, target_dcos) of the backward from float64 statistics, as op._backward makes them."""
    active = labels >= 0
    _, lse, gap = op.finalize(stats, active, settings.label_smoothing, num_classes)
    grad_rows = torch.where(active, torch.linspace(0.5, 1.5, len(labels), dtype=torch.float64), 0.0)
    target_dcos = grad_rows * op.target_cosine_gradient(gap, stats.target_cos, active, settings, num_classes)
    return grad_rows, lse, target_dcos


@pytest.mark.parametrize("k,settings,dtype", [
    (1, {}, torch.float32),
    (3, dict(label_smoothing=0.1), torch.float32),
    (1, dict(easy_margin=True, margin_grad="straight_through"), torch.float32),
    (2, dict(m1=1.35, m2=0.0), torch.float32),
    (1, {}, torch.float16),  # bfloat16 gradient tiles (chunk_plan.gradient_dtype)
    # the clip rule: m1 = 4 takes most target angles past pi, where it differs from the threshold rules
    (2, dict(m1=4.0, m2=0.0, fallback="clip", clip_eps=0.05), torch.float32),
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
    CALLS.clear()
    with workspace_budget(n * k * 6 * 5):  # a few classes per chunk: the walk crosses many chunks
        stats = cuda_backend.forward(x, w, labels, options, norms)
    assert CALLS == [("partial_stats", (options.clip, False, False))]  # the clip's eps, or None: the op's rule
    ref_stats = torch_backend.forward(x.double(), w.double(), labels, settings_64, norms_64)
    for name, out, ref in zip(stats._fields, stats, ref_stats):
        if name == "logit_sum" and not options.label_smoothing:
            continue  # read only with label smoothing: the torch backend leaves it 0 otherwise
        assert rel_err(out, ref) < 1e-5, name
    grad_rows, lse, target_dcos = _backward_inputs(ref_stats, labels, settings_64, num_classes)
    CALLS.clear()
    with workspace_budget(n * k * 6 * 5):
        dx, dw = cuda_backend.backward(grad_rows.float(), x, w, labels, lse.float(), target_dcos.float(), options,
                                       num_classes, norms, w.dtype)
    ref_dx, ref_dw = torch_backend.backward(grad_rows, x.double(), w.double(), labels, lse, target_dcos, settings_64,
                                            num_classes, norms_64, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert dx.dtype == torch.float32 and dw.dtype == w.dtype
    assert rel_err(dx, ref_dx) < tol
    assert rel_err(dw, ref_dw) < tol
    # the fused projection wrote dW chunk by chunk, then dX (float32)
    projections = [details for op_name, details in CALLS if op_name == "project_rows"]
    chunks = sum(1 for op_name, _ in CALLS if op_name == "grad_chunk")
    assert len(projections) == chunks + 1 > 2
    assert projections[-1] == (torch.float32, x.dtype, torch.float32, n)
    assert sum(rows for *_, rows in projections[:-1]) == w.shape[0]
    assert all(details[:3] == (torch.float32, w.dtype, w.dtype) for details in projections[:-1])


@pytest.mark.parametrize("k,dtype", [(1, torch.bfloat16), (1, torch.float32), (3, torch.float16)])
def test_backward_chunks_are_aligned_to_64_classes(cpu_ops, k, dtype):
    """Every backward chunk but the last holds a multiple of 64 classes (cuda.CLASS_ALIGN), and G's
    rows are a full chunk apart in every chunk (the last one's padded): G's leading dimension is a
    multiple of 16 bytes throughout; dW is still right across the chunk boundaries."""
    n, num_classes = 5, 300
    x, w, labels = make_problem(n, num_classes, 8, k=k, seed=7, dtype=dtype)
    options = LossOptions(sub_centers=k).for_rows(n, x.device, torch.float32)
    settings_64 = LossOptions(sub_centers=k).for_rows(n, x.device, torch.float64)
    norms, norms_64 = row_norms(x, w), row_norms(x.double(), w.double())
    ref_stats = torch_backend.forward(x.double(), w.double(), labels, settings_64, norms_64)
    grad_rows, lse, target_dcos = _backward_inputs(ref_stats, labels, settings_64, num_classes)
    CALLS.clear()
    grad_dtype, split = chunk_plan.gradient_dtype(dtype), chunk_plan.split_operands(dtype)
    per_row = chunk_plan.workspace_bytes_per_row(n, 8, grad_dtype, split)
    with workspace_budget(100 * k * (per_row + 4 * n)):  # 100 classes fit: chunks of 64
        dx, dw = cuda_backend.backward(grad_rows.float(), x, w, labels, lse.float(), target_dcos.float(), options,
                                       num_classes, norms, w.dtype)
    chunks = [details for op_name, details in CALLS if op_name == "grad_chunk"]
    firsts, widths, row_bytes = zip(*chunks)
    assert len(chunks) > 2 and sum(widths) == num_classes * k
    assert all(first % cuda_backend.CLASS_ALIGN == 0 for first in firsts)
    assert all(width % (cuda_backend.CLASS_ALIGN * k) == 0 for width in widths[:-1])
    assert widths[-1] % (cuda_backend.CLASS_ALIGN * k) != 0  # 300 classes: the last chunk is short
    assert set(row_bytes) == {widths[0] * grad_dtype.itemsize}
    assert row_bytes[0] % 16 == 0
    ref_dx, ref_dw = torch_backend.backward(grad_rows, x.double(), w.double(), labels, lse, target_dcos, settings_64,
                                            num_classes, norms_64, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(dw, ref_dw) < tol and rel_err(dx, ref_dx) < tol


def test_class_align_is_the_extensions():
    """cuda.CLASS_ALIGN (backward chunks) and csrc/chunk_size.h's kClassAlign (forward chunks) agree."""
    from arcface_kernels import _C

    assert _C.CLASS_ALIGN == cuda_backend.CLASS_ALIGN


def test_backward_chunk_with_its_float32_dots_fits_the_budget():
    for n, d, budget in ((4096, 512, 64 * 2**20), (512, 128, 2**20), (7, 16, 5000)):
        with workspace_budget(budget):
            for dtype in (torch.bfloat16, torch.float32):
                classes = chunk_plan.chunk_classes(n, 10**7, 1, d, dtype, cuda_backend.backward_budget(n, d, dtype))
                per_class = chunk_plan.workspace_bytes_per_row(n, d, dtype) + 4 * n  # + grad_chunk's dots
                assert classes * per_class <= budget
                assert (classes + 2) * per_class > budget  # and uses most of it


@pytest.fixture
def cuda_on_cpu(cpu_ops, monkeypatch):
    """The `cuda` backend as the registry sees it, runnable on the CPU through the stand-ins."""
    import dataclasses

    backend = dataclasses.replace(registry.get_backend("cuda"), available=lambda device: (True, ""))
    monkeypatch.setitem(registry._BACKENDS, "cuda", backend)


@pytest.mark.parametrize("mode", ["curricular", "filter", "mv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_nontarget_epilogue_reaches_both_ops(cuda_on_cpu, mode, dtype):
    """tests/test_nontarget.py's GPU test of the `cuda` backend, run on the stand-ins: the op's
    threshold and (a, b, e) reach partial_stats and every grad_chunk (several chunks), and the loss
    and gradients match the float64 oracle."""
    import test_nontarget

    CALLS.clear()
    test_nontarget.check_fused_backend("cuda", mode, dtype, torch.device("cpu"))
    forward = [details for op_name, details in CALLS if op_name == "partial_stats"]
    backward = [details for op_name, details in CALLS if op_name == "grad_chunk negatives"]
    assert forward == [(None, True, True)]
    assert len(backward) > 1 and set(backward) == {(True, True)}
