"""LossOptions: every setting of the loss except the tensors, in one frozen object.

It is built once by the public API (or a head, at construction), validated there
(validation.check_options), carried through the op to every backend, and flattened only at
the torch.library boundary (`flatten` / `unflatten`), whose schemas cannot take a Python
object. Adding an option means a field here, its rule in validation.py, and the code that
uses it.
"""

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import validation
from .margins import CLIP_EPS, FALLBACKS
from .negatives import NONTARGET_MODES

Margin = float | Tensor
REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "straight_through")
MARGIN_NAMES = ("m1", "m2", "m3")
# Settings that may be tensors: they cross the torch.library boundary as tensors, not in `flatten`.
TENSOR_NAMES = MARGIN_NAMES + ("nontarget_t",)


def _choice(*choices):
    return dict(choices=choices)


@dataclass(frozen=True, eq=False)
class LossOptions:
    """The loss settings of docs/design.md section 2.

    m1, m2, m3 are floats or per-row (N,) tensors as the caller gave them; `for_rows` turns
    them into the (N,) tensors the backends read. nontarget selects the non-target epilogue
    (negatives.py, docs/design.md section 3c) and nontarget_t is its parameter: CurricularFace's
    t (a float or a 0-d tensor, e.g. a running buffer), MV-Softmax's weight, or the filtering
    threshold; `for_rows` makes it a 0-d tensor of the compute dtype (None when nontarget is "none").
    """

    scale: float = 64.0
    m1: Margin = 1.0
    m2: Margin = 0.5
    m3: Margin = 0.0
    sub_centers: int = 1
    easy_margin: bool = False
    fallback: str = field(default="threshold", metadata=_choice(*FALLBACKS))
    clip_eps: float = CLIP_EPS
    margin_grad: str = field(default="exact", metadata=_choice(*MARGIN_GRADS))
    nontarget: str = field(default="none", metadata=_choice(*NONTARGET_MODES))
    nontarget_t: float | Tensor = 0.0
    label_smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = field(default="mean", metadata=_choice(*REDUCTIONS))

    def __post_init__(self):
        for name, value in validation.check_options(self).items():
            object.__setattr__(self, name, value)
        # encoded once: the op's schema takes these on every call (`flatten`)
        object.__setattr__(self, "_flat", tuple(_encode(f, getattr(self, f.name)) for f in _SCALAR_FIELDS))

    # The per-call non-target epilogue (negatives.HardNegatives), attached by the op once it has
    # the target cosines (with_negatives); None without one.
    negatives = None

    def derived(self, **values) -> "LossOptions":
        """A copy with `values` set and not validated again: values derived from settings already
        validated (for_rows' per-row tensors, the sharded loss's gathered rows, negatives)."""
        options = object.__new__(type(self))
        options.__dict__.update(self.__dict__, **values)
        return options

    def with_negatives(self, negatives) -> "LossOptions":
        """A copy carrying `negatives` (negatives.HardNegatives or None) for the backends."""
        return self.derived(negatives=negatives)

    @property
    def straight_through(self) -> bool:
        """margin_grad == "straight_through": dphi/dc is taken as 1."""
        return self.margin_grad == "straight_through"

    @property
    def clip(self) -> float | None:
        """fallback == "clip": AdaFace's eps, the bound of the clipped angle (margins.phi); else None."""
        return self.clip_eps if self.fallback == "clip" else None

    def replace(self, owner: str = "LossOptions.replace()", **changes) -> "LossOptions":
        """A copy with some settings changed (validated again); an unknown name is a TypeError
        naming `owner`, the caller the user called."""
        _check_names(owner, changes)
        return dataclasses.replace(self, **changes)

    def for_rows(self, n: int, device: torch.device, dtype: torch.dtype) -> "LossOptions":
        """The same options with m1, m2, m3 as (N,) tensors of `dtype` on `device` (floats
        broadcast) and nontarget_t as a 0-d tensor there (None without a non-target epilogue).
        m2 and m3 tensors keep their autograd history (the op returns their gradient); an m1
        that requires grad is refused at construction (validation.py). The settings were
        validated when `self` was built: they are not validated again (once per head, not per
        step), nor copied one by one."""
        return self.derived(m1=validation.row_margin("m1", self.m1, n, device, dtype),
                            m2=validation.row_margin("m2", self.m2, n, device, dtype),
                            m3=validation.row_margin("m3", self.m3, n, device, dtype),
                            nontarget_t=validation.nontarget_parameter(self.nontarget, self.nontarget_t, device,
                                                                       dtype))

    # -- the torch.library boundary ------------------------------------------------------------

    def flatten(self) -> list:
        """The scalar settings as floats, in field order (choices by index, bools as 0/1), encoded
        once when the options were built."""
        return list(self._flat)

    @classmethod
    def unflatten(cls, values, m1: Tensor, m2: Tensor, m3: Tensor, nontarget_t: Tensor | None = None) -> "LossOptions":
        """The options `flatten` encoded (validated when they were built: not checked again; the
        decoding is cached, as a head passes the same values on every step)."""
        options = object.__new__(cls)
        options.__dict__.update(_decoded(tuple(values)), m1=m1, m2=m2, m3=m3, nontarget_t=nontarget_t)
        return options


def make_options(owner: str, **settings) -> LossOptions:
    """LossOptions from keyword settings, where an unknown name (a typo, or another library's
    keyword such as insightface's margin_list) is a TypeError naming `owner`, the head or
    function the user called, and listing the settings it takes."""
    _check_names(owner, settings)
    return LossOptions(**settings)


def _check_names(owner, settings):
    unknown = sorted(set(settings) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"{owner} got an unexpected keyword argument {unknown[0]!r}; "
                        f"its loss settings are {', '.join(sorted(OPTION_NAMES))}")


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(LossOptions))
_SCALAR_FIELDS = tuple(f for f in dataclasses.fields(LossOptions) if f.name not in TENSOR_NAMES)


def _encode(f, value):
    if "choices" in f.metadata:
        return float(f.metadata["choices"].index(value))
    return float(value)


@functools.lru_cache(maxsize=256)
def _decoded(values: tuple) -> dict:
    """The settings `flatten` encoded as `values`, with the encoding itself (`_flat`). Read only:
    unflatten copies it into each LossOptions."""
    return {"_flat": values, **{f.name: _decode(f, v) for f, v in zip(_SCALAR_FIELDS, values)}}


def _decode(f, value):
    if "choices" in f.metadata:
        return f.metadata["choices"][int(value)]
    return f.type(value) if f.type in (int, bool) else float(value)
