"""The dtype rules, in one place (docs/design.md section 2).

Inputs are float32, float16 or bfloat16 (float64 too, for checks and gradcheck). Every
reduction, softmax statistic and target gradient is computed in float32, or in float64 for
float64 inputs, on operands of one dtype (op.py: the autocast dtype, or the inputs' own);
gradients come back in each input's own dtype, rounded once to nearest: a gradient is exact in
its dtype or inf, never clamped (GradScaler must see the overflow).
"""

import torch

# Input dtypes the op takes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Input dtypes the compiled (triton, cuda) kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of losses, statistics and accumulations for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32

