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
        (dict(w=torch.randn(6, 7)), ValueError, "with the embeddings. D"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "labels must be 1-D with N=4"),
        (dict(y=torch.zeros(4)), TypeError, "labels must be int64"),
        (dict(y=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be int64"),  # as F.cross_entropy
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(sub_centers=2.0), TypeError, "sub_centers must be an int"),
        (dict(easy_margin=1), TypeError, "easy_margin must be a bool"),
        (dict(scale=float("inf")), ValueError, "scale must be finite"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(scale=torch.ones(2)), TypeError, "scale must be a float"),
        (dict(m2=28.6), ValueError, r"m2=28.6 looks like degrees: margins are in radians .*28.6 degrees = 0.499 rad"),
        (dict(m2=-2.0), ValueError, "margins are in radians"),
        (dict(m2=torch.tensor([0.5, 0.5, 30.0, 0.5])), ValueError, "m2=30 looks like degrees"),
        (dict(m2=torch.tensor([0.5, float("nan"), 0.5, 0.5])), ValueError, "m2 must be finite"),
        (dict(m1=0.0), ValueError, "m1 .* must be positive"),
        (dict(m3=1.5), ValueError, r"m3 .* must lie in \(-1, 1\)"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be finite"),
        (dict(m1=torch.full((4,), 1.0, requires_grad=True)), ValueError, "m1 requires grad, but the multiplicative"),
        (dict(m3=torch.tensor(0.1, requires_grad=True)), ValueError, "m3 requires grad"),
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


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_label_dtypes_f_cross_entropy_takes(dtype):
    x, w, y = make_problem(4, 6, 5)
    ref = ak.margin_softmax_loss(x, w, y, backend="torch")
    assert torch.equal(ak.margin_softmax_loss(x, w, y.to(dtype), backend="torch"), ref)
    torch.nn.functional.cross_entropy(x @ w.T, y.to(dtype))  # the same dtypes F.cross_entropy takes


def test_numpy_scalars_and_0d_tensors_are_accepted_as_numbers():
    np = pytest.importorskip("numpy")
    x, w, y = make_problem(4, 6, 5)
    ref = ak.margin_softmax_loss(x, w, y, scale=30.0, m2=0.25, label_smoothing=0.125, ignore_index=-1,
                                 sub_centers=1, backend="torch")
    for number in (np.float32, np.float64, lambda v: torch.tensor(v, dtype=torch.float64)):
        got = ak.margin_softmax_loss(x, w, y, scale=number(30.0), m2=number(0.25), label_smoothing=number(0.125),
                                     ignore_index=np.int64(-1), sub_centers=torch.tensor(1), backend="torch")
        assert torch.equal(got, ref)


def test_heads_validate_at_construction():
    with pytest.raises(ValueError, match="looks like degrees"):
        ak.ArcFaceLoss(10, 4, margin=28.6)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ak.CosFaceLoss(10, 4, ignore_index=0.5)


def test_bad_label_is_caught_under_torch_compile_on_the_reference_backend():
    x, w, y = make_problem(4, 6, 5)
    bad = y.clone()
    bad[1] = 6

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(x, w, y):
        return ak.margin_softmax_loss(x, w, y, backend="reference")

    torch._dynamo.reset()
    assert torch.allclose(loss(x, w, y), ak.margin_softmax_loss(x, w, y, backend="reference"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\).*got 6"):
        loss(x, w, bad)
