"""Every input rule of the op, in one place: options, tensors and labels.

Bad input gets a ValueError or TypeError naming the argument before any kernel runs
(docs/design.md section 2), never a device assert or a silent wrong answer.
"""

import math
import numbers
import operator

import torch
from torch import Tensor

from .dtypes import FLOAT_DTYPES

# What F.cross_entropy takes as class labels ("expected target dtype to be Long or Byte").
LABEL_DTYPES = (torch.int64, torch.uint8)
# An additive angular margin m2 is an angle in radians: |m2| < pi / 2 keeps phi meaningful; a
# larger value is almost always a margin given in degrees.
MAX_ANGULAR_MARGIN = math.pi / 2


def _no_grad_margin(name, value):
    """Per-row m2 and m3 may require grad (the op returns d loss / d m, docs/design.md eq. (17a));
    m1 may not, nor a 0-d margin tensor (it is read as a float, which would drop the gradient)."""
    if not (isinstance(value, Tensor) and value.requires_grad):
        return
    if name == "m1":
        raise ValueError("m1 requires grad, but the multiplicative margin carries no gradient (the op "
                         "differentiates through m2 and m3 only); pass m1.detach()")
    if value.dim() == 0:
        raise ValueError(f"{name} requires grad as a 0-d tensor, which is read as a float (no gradient); pass "
                         f"{name}.detach(), or an (N,) tensor of per-row margins to get their gradient")


def _real(name, value):
    """A finite Python float from a Python / numpy number or a 0-d tensor."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a float, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    # comparisons, not math.isfinite: they trace under torch.compile(dynamic=True)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def integer(name, value):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def positive_int(name, value):
    """A positive Python int (bools and floats refused: ArcFaceLoss(5.5, 8) is a TypeError naming
    the argument, not a torch-internal message)."""
    value = integer(name, value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def fraction(name, value):
    """A float in (0, 1] (Partial FC's sample_rate)."""
    value = _real(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return value


def angle(name, value):
    """An angle in radians within [0, pi]; a larger value is almost always degrees."""
    value = _real(name, value)
    if not 0.0 <= value <= math.pi:
        hint = f" ({value:g} degrees = {math.radians(value):.4f} rad)" if math.pi < value <= 180.0 else ""
        raise ValueError(f"{name}={value:g} must be an angle in radians within [0, pi]{hint}")
    return value


def boolean(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _margin(name, value):
    """A float margin, or a per-row tensor (its shape and values are checked in row_margin)."""
    _no_grad_margin(name, value)
    if isinstance(value, Tensor) and value.dim() > 0:
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value
    value = _real(name, value)
    _check_margin_range(name, value, value)
    return value


def _check_margin_range(name, low, high):
    """m1 > 0; |m2| < pi / 2 (radians); |m3| < 1 (a cosine offset). low, high: the extreme values."""
    if name == "m1" and low <= 0:
        raise ValueError(f"m1 (the multiplicative angular margin) must be positive, got {low}")
    if name == "m2":
        worst = high if abs(high) >= abs(low) else low
        if abs(worst) >= MAX_ANGULAR_MARGIN:
            raise ValueError(
                f"m2={worst:g} looks like degrees: margins are in radians and |m2| must be below pi/2 "
                f"({worst:g} degrees = {math.radians(worst):.3f} rad)"
            )
    if name == "m3" and max(abs(low), abs(high)) >= 1.0:
        raise ValueError(f"m3 (the additive cosine margin) must lie in (-1, 1), got {high if abs(high) >= 1 else low}")


def check_options(options) -> dict:
    """Validated, normalized values of a LossOptions' fields (numbers as Python floats / ints)."""
    from .margins import FALLBACKS
    from .negatives import NONTARGET_MODES
    from .options import MARGIN_GRADS, REDUCTIONS

    values = {
        "scale": _real("scale", options.scale),
        "m1": _margin("m1", options.m1),
        "m2": _margin("m2", options.m2),
        "m3": _margin("m3", options.m3),
        "sub_centers": integer("sub_centers", options.sub_centers),
        "easy_margin": boolean("easy_margin", options.easy_margin),
        "fallback": _choice("fallback", options.fallback, FALLBACKS),
        "clip_eps": _real("clip_eps", options.clip_eps),
        "margin_grad": _choice("margin_grad", options.margin_grad, MARGIN_GRADS),
        "nontarget": _choice("nontarget", options.nontarget, NONTARGET_MODES),
        "nontarget_t": _nontarget_t(options.nontarget, options.nontarget_t),
        "label_smoothing": _real("label_smoothing", options.label_smoothing),
        "ignore_index": integer("ignore_index", options.ignore_index),
        "reduction": _choice("reduction", options.reduction, REDUCTIONS),
    }
    if values["scale"] <= 0:
        raise ValueError(f"scale must be a positive float, got {values['scale']}")
    if values["sub_centers"] < 1:
        raise ValueError(f"sub_centers must be a positive int, got {values['sub_centers']}")
    if not 0.0 < values["clip_eps"] < MAX_ANGULAR_MARGIN:
        raise ValueError(f"clip_eps (the clipped angle's distance to 0 and pi, radians) must lie in (0, pi/2), "
                         f"got {values['clip_eps']}")
    if not 0.0 <= values["label_smoothing"] <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {values['label_smoothing']}")
    return values


def _nontarget_t(mode, value):
    """The non-target map's parameter (negatives.py): a finite float, or for CurricularFace a 0-d
    floating tensor (its running t, read on the device: never .item()'d) that does not require
    grad (the authors update t under no_grad; the map's t carries no gradient). None: the
    for_rows form of an unused parameter (mode "none")."""
    if value is None and mode == "none":
        return value
    if isinstance(value, Tensor) and value.dim() == 0 and mode == "curricular":
        if not value.dtype.is_floating_point:
            raise TypeError(f"nontarget_t must be a floating tensor, got {value.dtype}")
        if value.requires_grad:
            raise ValueError("nontarget_t requires grad, but the non-target map's t carries no gradient; pass "
                             "t.detach()")
        return value
    value = _real("nontarget_t", value)
    if mode == "mv" and value < 1.0:
        raise ValueError(f"nontarget_t (MV-Softmax's mv_weight t, hard negatives become t c + t - 1) must be "
                         f">= 1, got {value}")
    return value


def nontarget_parameter(mode, value, device, dtype):
    """nontarget_t as the 0-d tensor of `dtype` on `device` the op takes (None for mode "none")."""
    if mode == "none":
        return None
    if isinstance(value, Tensor):
        if value.device != device:
            raise ValueError(f"nontarget_t must be on {device}, got {value.device}")
        return value.detach().to(dtype)
    return torch.full((), value, dtype=dtype, device=device)


def row_margin(name, value, n, device, dtype):
    """A margin as an (N,) tensor of `dtype` on `device`; a float is broadcast. A tensor keeps its
    autograd history (m2, m3 may require grad: docs/design.md eq. (17a))."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name} as a tensor must have shape ({n},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")
        if n and not torch.compiler.is_compiling():  # reads the values: one host sync
            low, high = value.min().item(), value.max().item()
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{name} must be finite, got a non-finite entry")
            _check_margin_range(name, low, high)
        return value.to(dtype).contiguous()
    return torch.full((n,), float(value), dtype=dtype, device=device)


def check_labels(labels, n_rows: int) -> Tensor:
    """The label rule of every entry path: a 1-D int64 or uint8 tensor (the class-index dtypes
    F.cross_entropy takes) with one entry per row, returned as int64. Widened once, here, so that
    every later comparison is on the values the user meant: uint8 156 is class 156, never
    ignore_index=-100 wrapped modulo 256. Float, bool and int32 labels are refused, not truncated."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 (or uint8), as F.cross_entropy takes them, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels must be 1-D with N={n_rows} entries, got shape {tuple(labels.shape)}")
    return labels.long()


def check_rows(embeddings, weight, sub_centers):
    """Shapes, dtypes and devices of the embeddings (N, D) and the class rows (C * K, D)."""
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (C * sub_centers, D), got shape {tuple(weight.shape)}")
    if embeddings.shape[1] != weight.shape[1]:
        hint = (" (rows are classes: a (D, C) weight such as pytorch-metric-learning's W must be transposed)"
                if weight.shape[0] == embeddings.shape[1] else "")
        raise ValueError(
            f"weight must be (C * sub_centers, D) with the embeddings' D: embeddings {tuple(embeddings.shape)}, "
            f"weight {tuple(weight.shape)}{hint}"
        )
    if embeddings.shape[1] == 0:
        raise ValueError("embeddings and weight must have D >= 1")
    if embeddings.device != weight.device:
        raise ValueError(f"embeddings and weight must be on one device, got {embeddings.device}, {weight.device}")
    if weight.shape[0] == 0 or weight.shape[0] % sub_centers:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, which is not a positive multiple of sub_centers={sub_centers}"
        )


def operand_dtype(embeddings, weight) -> torch.dtype:
    """The dtype the backends multiply in: under torch.autocast the autocast dtype (float64 is left
    alone, as autocast does), else the inputs' common dtype. The tensors are not cast here: the op
    casts its operands and returns each gradient in its input's own dtype (a float32 master
    weight gets its float32 gradient)."""
    device_type = embeddings.device.type
    if torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        x_dtype, w_dtype = (t.dtype if t.dtype == torch.float64 else autocast_dtype for t in (embeddings, weight))
    else:
        x_dtype, w_dtype = embeddings.dtype, weight.dtype
    if x_dtype != w_dtype:
        raise TypeError(
            f"embeddings ({embeddings.dtype}) and weight ({weight.dtype}) must have the same dtype "
            "(or run under torch.autocast)"
        )
    return x_dtype


def check_tensors(embeddings, weight, labels, sub_centers) -> Tensor:
    """Every tensor rule of the loss; returns the labels as int64 (check_labels)."""
    check_rows(embeddings, weight, sub_centers)
    labels = check_labels(labels, embeddings.shape[0])
    if labels.device != embeddings.device:
        raise ValueError(f"labels must be on the embeddings' device {embeddings.device}, got {labels.device}")
    return labels


def invalid_labels(labels: Tensor, ignore_index: int, num_classes: int) -> Tensor:
    """Mask of the int64 labels outside [0, num_classes) that are not ignore_index."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def label_error(ignore_index: int, num_classes: int, detail: str) -> ValueError:
    return ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; {detail}")


def target_labels(labels: Tensor, ignore_index: int, num_classes: int) -> Tensor:
    """int64 labels (check_labels) as backends take them: -1 on ignored rows. A label outside
    [0, num_classes) other than ignore_index: on the CPU a ValueError (it reads the labels); on a
    GPU a device-side assert, as F.cross_entropy's, with no host read (the message says which
    rule; the CUDA context is unusable after it, and CUDA_LAUNCH_BLOCKING=1 shows where)."""
    if labels.dtype != torch.int64:
        raise TypeError(f"target_labels takes the int64 labels of check_labels, got {labels.dtype}")
    if labels.device.type == "cpu" and labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))
        if 0 <= low and high < num_classes and not low <= ignore_index <= high:
            return labels.clone()  # every label a class, none ignored: the one read decides
    ignored = labels == ignore_index
    if labels.device.type == "cpu":
        bad = invalid_labels(labels, ignore_index, num_classes)
        if bool(bad.any()):
            raise label_error(ignore_index, num_classes, f"got {int(labels[bad][0])}")
    else:
        torch._assert_async(labels_in_range(labels, ignored, num_classes),
                            str(label_error(ignore_index, num_classes, "got another")))
    return torch.where(ignored, -1, labels)


def labels_in_range(labels: Tensor, ignored: Tensor, num_classes: int) -> Tensor:
    """0-d bool, on the labels' device: no label is invalid (invalid_labels) given the mask of
    ignored rows. Four launches: floor(l / C) == 0 exactly when 0 <= l < C (int64)."""
    return torch.where(ignored, 0, labels).div(num_classes, rounding_mode="floor").eq(0).all()
