"""The dtype rules, in one place (docs/design.md section 2).

Inputs are float32, float16 or bfloat16 (float64 too, for checks and gradcheck). Every
reduction, softmax statistic and target gradient is computed in float32, or in float64 for
float64 inputs; gradients come back in each input's own dtype.
"""

import torch

# Input dtypes the op takes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Input dtypes the compiled (triton, cuda) kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of losses, statistics and accumulations for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saturating_cast(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a gradient, saturating at the dtype's largest value instead of overflowing to inf.

    A zero vector's gradient is scaled by 1 / eps (as through F.normalize), which float16
    cannot hold.
    """
    if grad.dtype == dtype:
        return grad
    limit = torch.finfo(dtype).max
    return grad.clamp(-limit, limit).to(dtype)
