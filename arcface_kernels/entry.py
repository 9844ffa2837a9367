"""The one entry pipeline (docs/design.md section 2, "One entry pipeline").

Every public entry that computes the loss — margin_softmax_loss and its named forms, the heads
(with and without Partial FC), the sharded loss and compat's heads — turns what the user passed
into what the op takes here, and nowhere else:

1. autodiff modes the op does not support are refused by name (torch.func, forward-mode AD);
2. tensors: shapes, dtypes and devices (validation.check_rows), the operand dtype under autocast
   (validation.operand_dtype: the tensors are not cast here, the op casts them and returns each
   gradient in its input's dtype);
3. labels: int64 or uint8, widened once to int64 (validation.check_labels), so that
   ignore_index is compared with the values the user meant on every later step;
4. options: per-row margins as (N,) tensors of the compute dtype (LossOptions.for_rows).

The label range check (one host sync) and the norms, overflow scaling and per-row precision
live in the op (op.py), which every path calls. predict/topk_classes and get_outliers take no
loss options; they share steps 2 and 3 (validation.check_rows, check_labels).
"""

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .dtypes import compute_dtype
from .options import LossOptions
from .validation import check_tensors, operand_dtype


class LossInputs(NamedTuple):
    embeddings: Tensor       # (N, D) as given: not cast
    weight: Tensor           # (C * K, D) as given
    labels: Tensor           # (N,) int64, ignore_index kept
    operand_dtype: torch.dtype  # what the backends multiply in (the autocast dtype under autocast)
    options: LossOptions     # m1, m2, m3 as (N,) tensors of the compute dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.operand_dtype)


def refuse_unsupported_autodiff(embeddings, weight):
    """torch.func transforms and forward-mode AD would otherwise get a silent zero tangent or an
    obscure error: the op registers reverse-mode autograd only."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise NotImplementedError(
            "margin_softmax_loss does not support torch.func transforms (grad, vjp, jvp, vmap, jacrev, "
            "jacfwd, hessian): its custom op has reverse-mode autograd only. Use loss.backward() or "
            "torch.autograd.grad."
        )
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None
                                               for t in (embeddings, weight)):
        raise NotImplementedError(
            "margin_softmax_loss does not support forward-mode AD (torch.autograd.forward_ad): "
            "it registers reverse-mode autograd only. Use loss.backward() or torch.autograd.grad."
        )


def prepare_loss_inputs(embeddings, weight, labels, options: LossOptions) -> LossInputs:
    """Steps 1-4 of the module docstring, for every loss entry point."""
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    refuse_unsupported_autodiff(embeddings, weight)
    labels = check_tensors(embeddings, weight, labels, options.sub_centers)
    dtype = operand_dtype(embeddings, weight)
    rows_options = options.for_rows(embeddings.shape[0], embeddings.device, compute_dtype(dtype))
    return LossInputs(embeddings, weight, labels, dtype, rows_options)
