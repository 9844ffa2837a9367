"""A training step of the fused op captures in a CUDA graph (torch.cuda.graph): it reads nothing
back on the host (docs/design.md section 2, "Norms and overflow"; the CPU count of the same fact
at the headline shape is tests/test_cost_model.py). Replayed on new data it gives the eager
step's loss and gradients. Needs a GPU: skipped elsewhere."""

import pytest
import torch

import arcface_kernels as ak

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _step(x, w, y, backend):
    loss = ak.margin_softmax_loss(x, w, y, backend=backend)
    loss.backward()
    return loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forward_and_backward_capture_in_a_cuda_graph(backend, dtype):
    ok, why = ak.backend_status(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(0)
    n, c, d = 96, 1500, 128

    def data():
        return (torch.randn(n, d, device="cuda", generator=g).to(dtype),
                torch.randn(c, d, device="cuda", generator=g).to(dtype),
                torch.randint(0, c, (n,), device="cuda", generator=g))

    x0, w0, y0 = data()
    x, w, y = x0.clone().requires_grad_(), w0.clone().requires_grad_(), y0.clone()
    # warm-up on a side stream (Triton compiles, cuBLAS and allocator state), as torch.cuda.graph asks
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = w.grad = None
            _step(x, w, y, backend)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = _step(x, w, y, backend)
    x1, w1, y1 = data()
    with torch.no_grad():
        x.copy_(x1)
        w.copy_(w1)
        y.copy_(y1)
    graph.replay()
    torch.cuda.synchronize()
    xe, we = x1.clone().requires_grad_(), w1.clone().requires_grad_()
    eager = _step(xe, we, y1, backend)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xe.grad, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(w.grad, we.grad, rtol=2e-2, atol=1e-5)
