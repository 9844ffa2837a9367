"""Class rows seen as given on a GPU (docs/design.md section 2, "Norms and overflow", eqs. (6b),
(24b)): no C x D copy of the weight, and exact gradients for class rows of any finite norm.

The numeric tests run the triton and torch backends with the GPU's sync-free rule
(common.device_rule patched on the CPU) on a GPU directly, else under Triton's interpreter in a child pytest
(TRITON_INTERPRET must be set before triton is imported), against the float64 oracle; float32 and
float16 (the interpreter's bfloat16 dot is wrong). The allocation test runs a training step on
fake CUDA tensors (tests/launch_probe.py's stubs) anywhere.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import arcface_kernels as ak
from arcface_kernels.backends import chunked, common

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
runs_here = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                               reason="needs a GPU or TRITON_INTERPRET=1 (test_under_the_interpreter)")


def _quantum(dtype):
    """The spacing of `dtype`'s subnormals: the absolute rounding of a value that small."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _problem(dtype, case):
    """(x, w, y) with class rows of the given kind; rows 2 and 5 are targets of rows 4 and 6."""
    g = torch.Generator().manual_seed(7)
    n, c, d = 9, 70, 40
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[4], y[6] = 2, 5
    x[6] = 0.9 * w[5] + 0.1 * x[6]  # near its class centre: a large target gradient
    big = torch.finfo(dtype).max
    norms = {
        # float32: norms 1e30 (f^2 underflows: eq. (24b)), and up to float32's largest / 2
        "norm_1e30": [1e30, 1e30, 1e30],
        "max_half": [big / 2, big / 4, big / 2],
        # rows of every size in one matrix, one of them a single huge entry among tiny ones
        "mixed": [1e30 if dtype == torch.float32 else big / 8, 1.0, 1e-3],
        # below eps (cos = 0, clamped) and just above it; float16: near its smallest normals
        "tiny": [1e-30, 1e-11, 1e-30] if dtype == torch.float32 else [1e-3, 1e-2, 1e-3],
        "beyond": [1.0, 1.0, 1.0],
    }[case]
    for row, norm in zip((2, 5, 11), norms):
        w[row] *= norm / w[row].norm()
    if case == "beyond":  # norm past float32's largest, an embedding parallel to it (not its class)
        w[30] = torch.full((d,), big / 2, dtype=torch.float64)
        x[3] = torch.ones(d, dtype=torch.float64)
    if case == "mixed":
        w[40] = torch.full((d,), 1e-30 if dtype == torch.float32 else 1e-4, dtype=torch.float64)
        w[40, d // 2] = big / 2
        y[0] = 40
    return x.to(dtype), w.to(dtype), y


@runs_here
@pytest.mark.parametrize("dtype, case", [(torch.float32, case) for case in ("norm_1e30", "max_half", "mixed")]
                         + [(dtype, case) for dtype in (torch.float32, torch.float16) for case in ("tiny", "beyond")]
                         + [(torch.float16, case) for case in ("max_half", "mixed")])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_class_rows_of_any_norm_match_the_float64_oracle(backend, dtype, case, monkeypatch):
    """Loss, dX and every row of dW (each to its own magnitude: a huge class row's gradient is tiny)
    with the GPU rule: embeddings seen scaled for headroom, class rows as given (the torch backend
    too: on a GPU it sees the same rows)."""
    from float64_oracle import oracle

    monkeypatch.setattr(common, "device_rule", lambda v: True)
    # the torch backend as on a GPU: torch ops (the CPU's fused epilogue reads raw class rows,
    # which the CPU's own rule scales)
    monkeypatch.setattr(chunked, "_CPU_OPS", None)
    x, w, y = _problem(dtype, case)
    xg, wg = x.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()
    loss = ak.margin_softmax_loss(xg, wg, y.to(DEVICE), scale=16.0, backend=backend)
    loss.backward()
    want_loss, want_dx, want_dw = oracle(x, w, y, scale=16.0)
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    assert abs(float(loss.detach()) - float(want_loss)) <= tol * abs(float(want_loss))
    dx, dw = xg.grad.cpu().double(), wg.grad.cpu().double()
    assert bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dw).all())
    assert float((dx - want_dx).norm() / want_dx.norm()) <= tol
    # each row against its own largest entry, to the dtype's subnormal spacing (a few N of them:
    # subnormal products in the float32 GEMMs and the rounding of the result itself)
    bound = tol * want_dw.abs().amax(dim=1, keepdim=True) + 64 * x.shape[0] * _quantum(dtype)
    assert bool(((dw - want_dw).abs() <= bound).all()), ((dw - want_dw).abs() / bound).amax(dim=1)


def _projection_rows(dim):
    """(grad, v, factor) for project_rows: a first block of ordinary rows (norms 2**-30 .. 2**40)
    and a second with rows of norms 2**63 .. 2**127 (f^2 underflows) and a row clamped at eps;
    grad as a backward makes it (A = f times a vector of order 1), partly along v."""
    g = torch.Generator().manual_seed(11)
    exponents = [-30, -3, 0, 5, 20, 40] * 11 + [63, 70, 100, 120, 126, 127]
    v = torch.randn(len(exponents), dim, generator=g, dtype=torch.float64)
    v *= torch.exp2(torch.tensor(exponents, dtype=torch.float64))[:, None] / v.norm(dim=1, keepdim=True)
    factor = 1.0 / v.norm(dim=1)
    factor[-3] = 0.0  # clamped at eps: grad passes through
    grad = (torch.randn(v.shape, generator=g, dtype=torch.float64) + 3.0 * v * factor[:, None]) * factor[:, None]
    grad[-3] = torch.randn(dim, generator=g, dtype=torch.float64)
    return grad.float(), v.float(), factor.float()


def _projected64(grad, v, factor):
    unit = v.double() * factor.double()[:, None]
    return grad.double() - (unit * grad.double()).sum(1, keepdim=True) * unit


@runs_here
def test_projection_kernel_for_rows_of_any_norm():
    """triton project_rows (eq. (24b)) on a program of ordinary rows (the per-row coefficient) and
    one holding rows whose f^2 underflows (the unit row per entry) against float64, each row to
    its own magnitude; the clamped row passes grad through."""
    from arcface_kernels.backends import triton as triton_backend

    dim = 64
    assert triton_backend.projection_blocks(dim)[0] == 64  # the first 64 rows: one program
    grad, v, factor = _projection_rows(dim)
    out = torch.empty_like(grad, device=DEVICE)
    triton_backend.project_rows(grad.to(DEVICE), v.to(DEVICE), factor.to(DEVICE), out)
    out, want = out.cpu().double(), _projected64(grad, v, factor)
    bound = 1e-6 * grad.double().abs().amax(dim=1, keepdim=True) + 4 * _quantum(torch.float32)
    assert bool(((out - want).abs() <= bound).all()), ((out - want).abs() / bound).amax(dim=1)
    assert torch.equal(out[-3], grad[-3].double())


def test_torch_projection_for_rows_of_any_norm():
    """chunk_plan.project_rows (the unfused projection, any device) on the same rows."""
    from arcface_kernels.backends.chunk_plan import project_rows

    grad, v, factor = _projection_rows(64)
    out = torch.empty_like(grad)
    project_rows(grad, v, factor, out)
    want = _projected64(grad, v, factor)
    bound = 1e-6 * grad.double().abs().amax(dim=1, keepdim=True) + 4 * _quantum(torch.float32)
    assert bool(((out.double() - want).abs() <= bound).all())


class _LargeTensors(TorchDispatchMode):
    """Every tensor of at least `size` elements that an ATen op creates (not views, in-place or out=
    results: the schema's alias annotations), with the op; the package's custom ops are entered, as
    in tests/alloc_probe.py."""

    def __init__(self, size):
        super().__init__()
        self.size, self.made = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from alloc_probe import _device_key

        kwargs = kwargs or {}
        if func.namespace == "arcface_kernels":
            with self:
                return func.redispatch(_device_key(args, kwargs), *args, **kwargs)
        out = func(*args, **kwargs)
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size:
                self.made.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_gpu_step_makes_no_copy_of_the_class_rows(backend, dtype, monkeypatch):
    """A training step on (fake) CUDA tensors: the forward creates no C x D tensor (the norm pass
    of W reads it only), the backward one, dW itself (a workspace of 64 KiB: chunks of 64 classes);
    no host read (a fake tensor has no value to read: any read raises)."""
    from launch_probe import _stubs, backward

    n, c, d = 16, 1024, 64
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(n, d, dtype=dtype, device="cuda", requires_grad=True)
        w = torch.empty(c, d, dtype=dtype, device="cuda", requires_grad=True)
        y = torch.empty(n, dtype=torch.int64, device="cuda")
        record, probe = [], _LargeTensors(c * d)
        with _stubs(monkeypatch, record), common.workspace_budget(2**16), probe:
            loss = ak.margin_softmax_loss(x, w, y, backend=backend)
            forward = list(probe.made)
            backward(loss)
    assert forward == []
    assert [shape for _, shape in probe.made] == [(c, d)], probe.made
    assert [r[1] for r in record if r[1] == "row_norms_kernel"] == ["row_norms_kernel"] * 3  # x, w; x again


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the tests above directly")
def test_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
           "any_norm and not under_the_interpreter", os.path.abspath(__file__)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout
