"""Rules every path keeps (issue #17), on every fused backend and the reference, against the
independent float64 oracle (tests/float64_oracle.py):

- a gradient is exact in its dtype or inf, never clamped: GradScaler must see an overflow;
- a float32 master weight gets the float32 gradient of the function of its operand-rounded
  values (docs/design.md section 2, "Dtypes");
- loss.backward() inside the autocast region gives what it gives outside;
- a well-classified row keeps the relative precision of its gradient (eq. (16)).
"""

import pytest
import torch
from float64_oracle import oracle

import arcface_kernels as ak
from arcface_kernels import op
from arcface_kernels.backends import chunked
from arcface_kernels.backends.reference import reference_loss
from arcface_kernels.dtypes import compute_dtype
from conftest import DEVICE
from helpers import TOL, confident_problem, make_problem, rel_err

FP16_MAX = torch.finfo(torch.float16).max


def _loss_rows(x, w, y, options, backend, operand_dtype):
    """Per-row losses from the layer the entry layer calls: op.fused_loss_rows, or reference_loss."""
    rows_options = options.for_rows(x.shape[0], x.device, compute_dtype(operand_dtype))
    if backend == "reference":
        return reference_loss(x, w, torch.where(y == options.ignore_index, -1, y), rows_options, operand_dtype)[0]
    return op.fused_loss_rows(x, w, y, rows_options, backend, operand_dtype)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_master_weight_gets_its_float32_gradient(dtype, any_backend):
    x, w, y = make_problem(6, 11, 8, seed=2, device=DEVICE)
    x = x.to(dtype).requires_grad_(True)     # what an autocast backbone hands over
    w = w.requires_grad_(True)               # the float32 master weight
    with torch.autocast(DEVICE.type, dtype=dtype):
        loss = _loss_rows(x, w, y, ak.LossOptions(scale=16.0), any_backend, dtype).mean()
        loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    want = oracle(x.detach().cpu(), w.detach().to(dtype).cpu(), y.cpu(), scale=16.0)
    assert rel_err(loss.detach().cpu(), want[0]) < 1e-5
    assert rel_err(x.grad.cpu(), want[1]) <= TOL[dtype]  # rounded once into float16 / bfloat16
    # float32 arithmetic on the rounded operands: float32's precision, not the operand dtype's,
    # except where the gradient tile itself is bfloat16 (chunk_plan.gradient_dtype; on the CPU
    # where the `torch` walk runs bfloat16 GEMMs, chunked.bf16_gemm)
    tiles_in_bf16 = dtype == torch.bfloat16 and (any_backend in ("triton", "cuda") or (
        any_backend == "torch" and DEVICE.type == "cpu" and chunked.bf16_gemm(dtype)))
    assert rel_err(w.grad.cpu(), want[2]) <= (TOL[dtype] if tiles_in_bf16 else 1e-5)


def test_scaled_gradients_overflow_to_inf_and_are_never_clamped(any_backend):
    # GradScaler's init_scale 2**16 on rows of very different norms: the gradient of the smallest
    # rows exceeds float16's range and must be inf (the scaler then skips the step); the others and
    # the float32 master weight's gradient are exact.
    x, w, y = make_problem(4, 9, 8, seed=5)
    x = x / x.norm(dim=1, keepdim=True) * torch.tensor([[1e-3], [1.0], [10.0], [100.0]])
    x = x.half().to(DEVICE).requires_grad_(True)
    w = w.to(DEVICE).requires_grad_(True)
    y = y.to(DEVICE)
    scale = 2.0**16
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = _loss_rows(x, w, y, ak.LossOptions(), any_backend, torch.float16).mean() * scale
    loss.backward()
    want = oracle(x.detach().cpu(), w.detach().half().cpu(), y.cpu())
    ref_dx, ref_dw = want[1] * scale, want[2] * scale
    over, under = ref_dx.abs() > 1.01 * FP16_MAX, ref_dx.abs() < 0.99 * FP16_MAX
    assert over.any() and under.any()
    dx = x.grad.cpu()
    assert torch.isinf(dx[over]).all() and torch.equal(dx[over].sign(), ref_dx[over].sign().half())
    assert rel_err(dx[under], ref_dx[under]) <= TOL[torch.float16]
    assert w.grad.dtype == torch.float32 and rel_err(w.grad.cpu(), ref_dw) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_inside_autocast_equals_backward_outside(dtype, any_backend):
    x, w, y = make_problem(6, 11, 8, seed=3, device=DEVICE)
    grads = []
    for inside in (True, False):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss = ak.margin_softmax_loss(xx, ww, y, scale=16.0, backend=any_backend)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append((xx.grad, ww.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_well_classified_rows_keep_their_gradient_precision(any_backend):
    # Every row near its own class centre: losses of 1e-7, where p_y - 1 = expm1(z_y - lse) would be
    # quantized to one float32 step of lse (dX was 0.4 off relative); expm1(-loss) keeps it.
    x, w, y = confident_problem(16)
    want = oracle(x, w, y, scale=30.0, reduction="none")
    assert want[0].max() < 1e-6
    xx, ww = x.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True)
    loss = ak.margin_softmax_loss(xx, ww, y.to(DEVICE), scale=30.0, reduction="none", backend=any_backend)
    loss.sum().backward()
    for name, got, ref in zip(("loss", "dX", "dW"), (loss.detach(), xx.grad, ww.grad), want):
        assert rel_err(got.cpu(), ref) < 1e-4, name
