"""The GPU norm pass (backends/triton/norms.py) against float64, and the op's sync-free rule.

Runs on a GPU directly, else under Triton's interpreter in a child pytest (TRITON_INTERPRET must be
set before triton is imported): ordinary, zero, tiny, huge and non-finite rows, odd D and D past
one column block (the online power-of-two rescaling), float16 / bfloat16 / float32.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import arcface_kernels as ak  # noqa: E402
from arcface_kernels.backends import common  # noqa: E402
from arcface_kernels.margins import NORM_EPS  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
runs_here = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                               reason="needs a GPU or TRITON_INTERPRET=1 (test_under_the_interpreter)")


def _rows(dtype, dim):
    """Rows of every kind `dtype` can hold; the peak sometimes in the last column block only."""
    g = torch.Generator().manual_seed(dim)
    big = torch.finfo(dtype).max
    rows = [torch.randn(dim, generator=g), torch.zeros(dim), torch.randn(dim, generator=g) * 1e-6]
    tiny = 1e-30 if dtype != torch.float16 else 1e-7  # float16: subnormal entries
    rows.append(torch.randn(dim, generator=g) * tiny)
    late_peak = torch.randn(dim, generator=g) * 1e-3
    late_peak[-1] = 40.0
    rows.append(late_peak)
    early_peak = torch.randn(dim, generator=g) * 1e-20
    early_peak[0] = 3.0
    rows.append(early_peak)
    if dtype != torch.float16:
        rows += [torch.randn(dim, generator=g) * 1e30, torch.full((dim,), big / 2), torch.full((dim,), big)]
        mixed = torch.randn(dim, generator=g) * 1e-30
        mixed[dim // 2] = 3e38
        rows.append(mixed)
    return torch.stack(rows).to(dtype)


def _expected(v, limit):
    """(inverse norms, scales) in float64 of the rows as given (docs/design.md section 2): rows
    whose largest entry reaches 2**limit scaled below it."""
    v64 = v.double()
    peak = v64.abs().amax(dim=1)
    exponent = torch.frexp(peak).exponent.double().where(peak > 0, common._MIN_EXPONENT).clamp_min(common._MIN_EXPONENT)
    shift = (exponent - limit).clamp_min(0)
    scale = torch.exp2(-shift)
    norm = torch.linalg.vector_norm(v64 * torch.exp2(-exponent)[:, None], dim=1) * torch.exp2(exponent - shift)
    return 1.0 / norm.clamp_min(NORM_EPS), scale


def _quantum(dtype):
    """The spacing of `dtype`'s subnormals."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


@runs_here
@pytest.mark.parametrize("limit", ["safe", "headroom", "none"])
@pytest.mark.parametrize("dim", [77, 1030])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_norm_kernel_matches_float64(dtype, dim, limit):
    """The three limits common.overflow_safe_rows uses: huge rows scaled (the host-read path),
    every row scaled below the dot headroom (the embeddings on a GPU), none (the class rows on a
    GPU: exact inverse norms, subnormal past 2**126, for rows of any finite size)."""
    from arcface_kernels.backends.triton import norms

    v = _rows(dtype, dim).to(DEVICE)
    limit = {"safe": common._safe_exponent(torch.float32), "headroom": -common.dot_headroom(dim),
             "none": common._NO_SHIFT}[limit]
    seen, inverse, scale = norms.seen_rows(v, limit, common._MIN_EXPONENT, NORM_EPS, True)
    want_inverse, want_scale = _expected(v.cpu(), limit)
    assert torch.equal(scale.cpu().double(), want_scale)
    # correctly rounded where normal; within a subnormal step (of the float32 result) below
    assert bool(((inverse.cpu().double() - want_inverse).abs()
                 <= 2e-6 * want_inverse + _quantum(torch.float32)).all())
    # the seen rows: exactly v times the scale (a power of two), in v's dtype, but where subnormal
    torch.testing.assert_close(seen.cpu().double(), (v.cpu().double() * want_scale[:, None]).to(dtype).double(),
                               rtol=0, atol=_quantum(dtype))
    assert bool(torch.isfinite(inverse).all()) and bool((inverse > 0).all())
    peaks = seen.cpu().double().abs().amax(dim=1)
    if limit < 0:  # every row below the headroom, none scaled up
        assert bool((peaks < 2.0**limit).all()) and bool((scale <= 1).all())
    elif dtype != torch.float16 and limit < common._NO_SHIFT:  # the huge rows below 2**safe, the others as given
        assert bool((peaks < 2.0**limit).all())
        assert bool((scale[-4:] < 1).all()) and bool((scale[:-4] == 1).all())
    else:
        assert bool((scale == 1).all())
    # without the copy: the same norms, v itself
    same, inverse_2, _ = norms.seen_rows(v, limit, common._MIN_EXPONENT, NORM_EPS, False)
    assert same is v and torch.equal(inverse_2, inverse)


@runs_here
def test_norm_kernel_propagates_nan_and_inf():
    from arcface_kernels.backends.triton import norms

    v = torch.randn(3, 33)
    v[0, 5], v[1, 7] = math.nan, math.inf
    _, inverse, _ = norms.seen_rows(v.to(DEVICE), 48, common._MIN_EXPONENT, NORM_EPS, True)
    assert math.isnan(inverse[0]) and inverse[1] == 0
    assert math.isfinite(inverse[2]) and inverse[2] > 0


@runs_here
@pytest.mark.parametrize("magnitude", [1.0, 1e30, 3e38, 1e-30])
def test_sync_free_rule_gives_the_exact_loss_and_gradients(magnitude, monkeypatch):
    """The op with the GPU rule (norm kernel, embeddings seen scaled for headroom, class rows as
    given) on the triton backend, against the float64 reference, with one class row and one embedding
    row at `magnitude`."""
    monkeypatch.setattr(common, "device_rule", lambda v: True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40, generator=g)
    w = torch.randn(70, 40, generator=g)
    x[2] *= magnitude / x[2].abs().max()  # the row's largest entry is `magnitude`
    w[5] *= magnitude / w[5].abs().max()
    y = torch.randint(0, 70, (9,), generator=g)
    y[4] = 5
    x, w, y = x.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_(), y.to(DEVICE)
    loss = ak.margin_softmax_loss(x, w, y, backend="triton")
    loss.backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = ak.margin_softmax_loss(x64, w64, y, backend="reference")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad)):
        assert bool(torch.isfinite(got).all())
        scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=1e-4)


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the tests above directly")
def test_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-k", "not under_the_interpreter and not compiles", os.path.abspath(__file__)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout


@pytest.mark.skipif(INTERPRETED, reason="compiles for a GPU target")
@pytest.mark.parametrize("arch, dtype", [(90, "bf16"), (80, "fp16")])
def test_norm_kernel_compiles_for_the_gpu(arch, dtype):
    """Compiled for sm_90 / sm_80 as the JIT would at D = 512 (no GPU needed): no spills, correctly
    rounded sqrt and division (the interpreter's numpy ones are), no flush of subnormal inputs,
    vectorized row loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arcface_kernels.backends.triton.norms import launch_shape, row_norms_kernel
    from triton_build import resource_usage

    fn = row_norms_kernel
    block_r, block_d = launch_shape(512)
    constants = dict(LIMIT=-common.dot_headroom(512), MIN_EXPONENT=common._MIN_EXPONENT, WRITE_SEEN=True,
                     BLOCK_R=block_r, BLOCK_D=block_d)
    signature = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in ("v_ptr", "seen_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "*fp32" if name.endswith("_ptr") else "fp32" if name == "eps" else "i32"
    # the JIT's runtime specialization: pointers and D, row strides divisible by 16
    aligned = [n for n, kind in signature.items() if kind.startswith("*") or n in ("D", "stride_v", "stride_seen")]
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    usage = resource_usage(compiled, arch)
    assert usage["spill_stores"] == usage["spill_loads"] == 0
    ptx = compiled.asm["ptx"]
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and ".ftz" not in ptx
    assert "ld.global.v4" in ptx or "ld.global.v2" in ptx
