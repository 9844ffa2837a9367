"""Headline-size checks on a GPU (skipped without one): accuracy and peak memory, and the
self-check's data (arcface_kernels/selfcheck.py: float64 reference, rows near their class centre,
several backward chunks, lse compared) per backend and dtype at its tolerances."""

import pytest
import torch

from arcface_kernels import backend_status, selfcheck
from conftest import BACKENDS
from helpers import loss_and_grads, make_problem, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Peak memory beyond inputs and their gradients that each backend promises (docs/design.md section 7).
EXTRA_MEMORY_LIMIT = {"triton": 64 * 2**20, "cuda": 256 * 2**20, "torch": 512 * 2**20}


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "torch"] or ["torch"])
def test_headline_shape_bf16(backend_name):
    n, c, d = 4096, 262144, 512
    x, w, y = make_problem(n, c, d, dtype=torch.bfloat16, seed=1, device="cuda", ignore=(7,))
    # Oracle: the torch backend in float32 on the same (bf16-rounded) inputs; it is itself
    # checked against the float64 reference in test_backends.py.
    ref = loss_and_grads(x.float(), w.float(), y, backend="torch")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = loss_and_grads(x, w, y, backend=backend_name)
    torch.cuda.synchronize()
    # loss_and_grads holds clones of x and w and their gradients: 4 input-sized tensors.
    inputs_and_grads = 2 * (x.numel() * x.element_size() + w.numel() * w.element_size())
    extra = torch.cuda.max_memory_allocated() - base - inputs_and_grads
    for name, o, r in zip(("loss", "dX", "dW"), out, ref):
        assert rel_err(o, r) < 3e-2, name
    assert extra < EXTRA_MEMORY_LIMIT[backend_name], f"{extra / 2**20:.0f} MiB extra"
    # and no N x C-sized allocation could have happened
    assert extra < n * c * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_selfcheck_data(backend_name, dtype):
    if not backend_status(backend_name, torch.device("cuda"), dtype)[0]:
        pytest.skip(f"{backend_name} does not take {dtype}")
    passed, errors = selfcheck.check(backend_name, "cuda", dtype)
    assert passed, (errors, selfcheck.TOLERANCE[dtype])
