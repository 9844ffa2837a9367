"""Bad input gets a clear Python error naming the argument, before any kernel runs."""

import pytest
import torch

import arcface_kernels as ak
from helpers import make_problem


def call(x=None, w=None, y=None, **kwargs):
    x0, w0, y0 = make_problem(4, 6, 5)
    return ak.margin_softmax_loss(x0 if x is None else x, w0 if w is None else w, y0 if y is None else y,
                                  backend=kwargs.pop("backend", "torch"), **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(4, 5, 1)), ValueError, "embeddings must be 2-D"),
        (dict(w=torch.randn(6)), ValueError, "weight must be 2-D"),
        (dict(w=torch.randn(6, 7)), ValueError, "share D"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "labels must be 1-D with N=4"),
        (dict(y=torch.zeros(4)), TypeError, "labels must be int64"),
        (dict(x=torch.randint(0, 3, (4, 5))), TypeError, "embeddings must be float"),
        (dict(w=torch.randn(6, 5, dtype=torch.float16)), TypeError, "same dtype"),
        (dict(x=[[1.0]]), TypeError, "embeddings must be a torch.Tensor"),
        (dict(sub_centers=4), ValueError, "sub_centers=4"),
        (dict(sub_centers=0), ValueError, "sub_centers must be a positive int"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(margin_grad="approx"), ValueError, "margin_grad must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must lie in"),
        (dict(scale=-1.0), ValueError, "scale must be a positive"),
        (dict(m2=torch.zeros(3)), ValueError, r"m2 as a tensor must have shape \(4,\)"),
        (dict(m1="big"), TypeError, "m1 must be a float"),
        (dict(y=torch.tensor([0, 1, 6, 2])), ValueError, r"labels must lie in \[0, 6\).*got 6"),
        (dict(y=torch.tensor([0, -1, 2, 2])), ValueError, "got -1"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_input_is_named(kwargs, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend=backend, **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="cudnn")


def test_ignore_index_label_is_accepted():
    assert torch.isfinite(call(y=torch.tensor([0, -100, 5, 2])))


def test_unavailable_backend_says_why():
    ok, reason = ak.backend_status("cuda", torch.device("cpu"))
    if ok:
        pytest.skip("the cuda backend is available here")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available on cpu"):
        call(backend="cuda")


def test_auto_picks_a_fused_backend_on_cpu():
    assert ak.resolve_backend("auto", torch.device("cpu")) in ("torch", "triton")
