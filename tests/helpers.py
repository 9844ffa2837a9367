"""Shared test utilities: random problems, the float64 oracle, relative errors, tolerances."""

import torch

import arcface_kernels as ak

# Relative-norm tolerances per input dtype: fp32 arithmetic, fp16/bf16 operands.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values"
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float(out.norm())


def make_problem(n, c, d, *, k=1, dtype=torch.float32, seed=0, ignore=(), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(c * k, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    for i in ignore:
        y[i] = -100
    return x.to(device, dtype), w.to(device, dtype), y.to(device)


def loss_and_grads(x, w, y, **kwargs):
    """Loss and (dX, dW) for an upstream gradient that differs per row when reduction='none'."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = ak.margin_softmax_loss(x, w, y, **kwargs)
    if loss.dim() == 1:
        weights = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
        (loss * weights.to(loss.device)).sum().backward()
    else:
        loss.backward()
    return loss.detach(), x.grad, w.grad


def reference64(x, w, y, **kwargs):
    """The reference backend on float64 copies of the inputs (margin tensors upcast too)."""
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    kwargs["backend"] = "reference"
    return loss_and_grads(x.double(), w.double(), y, **kwargs)


def assert_matches_reference(x, w, y, backend, tol=None, **kwargs):
    tol = tol if tol is not None else TOL[x.dtype]
    out = loss_and_grads(x, w, y, backend=backend, **kwargs)
    ref = reference64(x, w, y, **kwargs)
    assert out[1].dtype == x.dtype and out[2].dtype == w.dtype, "gradients must come back in the input dtype"
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        err = rel_err(o, r)
        assert err <= tol, f"{backend} {name}: relative error {err:.3g} > {tol:.1g}"
    return out


def confident_problem(n, c=8, seed=0):
    """Rows next to their own class centre (orthonormal centres, a quarter of the next class
    mixed in): at scale 30 every row's loss is below 1e-6, where p_y - 1 must not be quantized
    to one float32 step of lse."""
    g = torch.Generator().manual_seed(seed)
    w = torch.eye(c, c)
    y = torch.randint(0, c, (n,), generator=g)
    x = w[y] + 0.25 * w[(y + 1) % c] + 0.01 * torch.randn(n, c, generator=g)
    return x, w, y


class CountingOps:
    """The CPU extension's ops (torch.ops.arcface_kernels_cpu as it is when made), appending each
    called op's name to `calls`: what tests put in place of chunked._CPU_OPS to see which ops run."""

    def __init__(self, calls):
        self.calls, self._ops = calls, torch.ops.arcface_kernels_cpu

    def __getattr__(self, name):
        op = getattr(self._ops, name)
        return lambda *args, **kwargs: self.calls.append(name) or op(*args, **kwargs)
