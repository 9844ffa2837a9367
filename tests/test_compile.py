"""torch.compile(fullgraph=True) of a training step with the loss: no graph break."""

import torch
from torch._inductor.utils import fresh_inductor_cache

import arcface_kernels as ak


def test_compiled_training_step_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    head = ak.ArcFaceLoss(40, 8, scale=16.0, sub_centers=2, backend="torch")
    x = torch.randn(10, 12)
    y = torch.randint(0, 40, (10,))
    y[3] = -100

    def forward(x, y):
        return head(model(x), y, label_smoothing=0.1)

    eager = forward(x, y)
    eager.backward()
    eager_grads = [p.grad.clone() for p in list(model.parameters()) + [head.weight]]
    for p in list(model.parameters()) + [head.weight]:
        p.grad = None
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; the backward graph is compiled by AOTAutograd.
    # A fresh cache: a graph cached on disk by an older version of the op must not be reused.
    with fresh_inductor_cache():
        compiled = torch.compile(forward, fullgraph=True)
        got = compiled(x, y)
        got.backward()
    torch.testing.assert_close(got, eager)
    for p, g in zip(list(model.parameters()) + [head.weight], eager_grads):
        torch.testing.assert_close(p.grad, g)


def test_fake_kernel_matches_real_outputs():
    x = torch.randn(5, 4)
    w = torch.randn(9, 4)
    y = torch.tensor([0, 1, 2, -100, 8])
    options = ak.LossOptions(label_smoothing=0.1).for_rows(5, x.device, torch.float32)
    args = (x, w, y, options.m1, options.m2, options.m3, options.flatten(), "torch", torch.float32)
    torch.library.opcheck(torch.ops.arcface_kernels.margin_softmax_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
