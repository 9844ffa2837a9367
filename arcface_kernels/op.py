"""The fused op as torch.library custom ops, with registered autograd, and the forward and
backward cores that the sharded path (distributed.py) shares with it.

`arcface_kernels::margin_softmax_fwd` returns per-row loss and stats;
`arcface_kernels::margin_softmax_bwd` returns (dX, dW). Both dispatch by name to a fused
backend from the registry. torch.compile traces the forward op; eager calls on the CPU run its
implementation under `_EagerForward` (same context, same backward op), without the custom op's
dispatch layers. The LossOptions travel flattened (`LossOptions.flatten`): the
schemas take tensors and plain scalars only. Only O(N + C) numbers (the log-sum-exp, the
precise gap and target cosine, the inverse norms and row scales, computed once per call) are
saved for backward, which forms the target gradient factor from them once per row and
recomputes the cosines (docs/design.md section 5).

Dtypes (docs/design.md section 2, "Dtypes"): the op takes embeddings and weight as the user
holds them (e.g. a float16 activation and a float32 master weight under autocast) and an
operand dtype; it computes on the inputs rounded to the operand dtype and returns each gradient
in its input's dtype, rounded once to nearest (inf where it overflows, never clamped). The
rounded copies are made again in backward rather than saved: a C x D operand copy of a float32
weight is not held between forward and backward, at the cost of one more read of the weight.
"""

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import PartialStats, RowNorms, common, get_backend
from .dtypes import compute_dtype
from .margins import dphi_dcos, dphi_dmargins
from .negatives import HardNegatives, coefficients, hard_negatives, target_cosines
from .options import LossOptions
from .validation import target_labels as _target_labels


@torch.library.custom_op("arcface_kernels::target_labels", mutates_args=())
def target_labels(labels: Tensor, ignore_index: int, num_classes: int) -> Tensor:
    """validation.target_labels as an op: its ValueError on a bad label also fires inside a
    torch.compile'd graph, where a Python check on tensor values would be traced away."""
    return _target_labels(labels, ignore_index, num_classes)


@target_labels.register_fake
def _(labels, ignore_index, num_classes):
    return labels.new_empty(labels.shape, dtype=torch.int64)


def finalize(stats: PartialStats, active: Tensor, label_smoothing: float, num_classes: int):
    """Per-row (loss, lse, gap) from merged partial statistics (F.cross_entropy's smoothing);
    gap = lse - z_y, the unsmoothed loss (0 where the row is not active).

    With the non-target sum, gap = log(1 + sum_{j != y} exp(z_j - z_y)) is computed as
    logaddexp(0, log(sum_{j != y} exp(z_j - m)) + m - z_y) (docs/design.md eq. (12a)): a
    well-classified row's loss of 2e-7 keeps its relative precision instead of being the
    difference of two numbers near lse, and so does its target gradient expm1(-gap) (eq. (16)).
    """
    lse = stats.row_max + torch.log(stats.sum_exp)
    if stats.nontarget_sum_exp is None:
        gap = lse - stats.target_logit
    else:
        margin = torch.log(stats.nontarget_sum_exp) + stats.row_max - stats.target_logit
        gap = torch.logaddexp(torch.zeros_like(margin), margin)
    gap = torch.where(active, gap, 0.0)
    loss = gap
    if label_smoothing:
        loss = loss + label_smoothing * stats.target_logit - (label_smoothing / num_classes) * stats.logit_sum
    return torch.where(active, loss, 0.0), lse, gap


def _target_factor(gap: Tensor, options: LossOptions, num_classes: int):
    """d loss_i / d phi_i per unit upstream gradient on rows with a target: s (expm1(-gap) + eps - eps/C)
    (eq. (16) times s, with p_y - 1 = expm1(-gap) from the precise gap of `finalize`)."""
    eps = options.label_smoothing
    return options.scale * (torch.expm1(-gap) + (eps - eps / num_classes))


def target_cosine_gradient(gap: Tensor, target_cos: Tensor, active: Tensor, options: LossOptions, num_classes: int):
    """d loss_i / d cos_iy per unit upstream gradient, once per row (docs/design.md eqs. (16)-(17)):
    s (expm1(-gap) + eps - eps/C) dphi/dc(cos_iy); 0 on rows without a target. Backends write g_i
    times it at the target entry instead of recomputing phi and dphi/dc in every tile."""
    slope = dphi_dcos(target_cos, options.m1, options.m2, options.m3, options.easy_margin, options.straight_through,
                      options.clip)
    return torch.where(active, _target_factor(gap, options, num_classes) * slope, 0.0)


def margin_gradients(grad_rows: Tensor, gap: Tensor, target_cos: Tensor, active: Tensor, options: LossOptions,
                     num_classes: int):
    """(d loss / d m2, d loss / d m3), (N,) each: g_i s (expm1(-gap) + eps - eps/C) dphi/dm (docs/design.md
    eq. (17a)), from what forward saved, O(N): the margin enters the target logit only; 0 on rows
    without a target."""
    factor = torch.where(active, grad_rows * _target_factor(gap, options, num_classes), 0.0)
    d_m2, d_m3 = dphi_dmargins(target_cos, options.m1, options.m2, options.easy_margin, options.clip)
    return factor * d_m2, factor * d_m3


def autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False) where autocast is on; where it is off, no
    context at all (entering and leaving one costs more than a small op on every call)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Saved(NamedTuple):
    """What backward needs from forward: O(N + C) numbers."""

    lse: Tensor          # (N,) compute dtype
    gap: Tensor          # (N,) finalize's precise lse - z_y (0 on rows without a target)
    target_cos: Tensor   # (N,) merged
    rx: Tensor           # inverse norms of the rows the backend saw
    rw: Tensor
    sx: Tensor | None    # common.overflow_safe_rows' scales (None: every row seen as given)
    sw: Tensor | None
    negatives: HardNegatives | None = None  # the non-target epilogue's tau and (a, b, e) (negatives.py)


class Forward(NamedTuple):
    loss: Tensor         # (N,) compute dtype, 0 on rows without a target
    stats: PartialStats  # merged
    saved: Saved


def operands(v: Tensor, operand_dtype: torch.dtype) -> Tensor:
    """v rounded to the operand dtype (v itself when it already has it)."""
    return v if v.dtype == operand_dtype else v.to(operand_dtype)


def _seen_rows(x: Tensor, w: Tensor):
    """((x_seen, rx, sx), (w_seen, rw, sw)): the rows a backend sees and their inverse norms and
    scales (common.overflow_safe_rows; the embeddings with headroom), for both forward walks."""
    dtype = compute_dtype(x.dtype)
    return (common.overflow_safe_rows(x, dtype, sync_free=True, headroom=True),
            common.overflow_safe_rows(w, dtype, sync_free=True))


def forward_stats(x: Tensor, w: Tensor, labels: Tensor, active: Tensor, options: LossOptions, backend: str,
                  num_classes: int, merge=None, merge_rows=None, update_t=None) -> Forward:
    """The forward of the op on operands x, w (one dtype): the overflow-safe rows, the backend's
    partial statistics, merge(stats) when given (the sharded path's all-reduces, eq. (14)) and the
    precise loss. labels: local targets (-1 where absent); active: rows that have a target in the
    whole problem. With a non-target epilogue the target cosines come first (negatives.py), summed
    over class shards by merge_rows when given; update_t(target_cos, active), when given, returns
    the map's t moved from them (a running CurricularFace t, updated before use). The target
    gradient factor is backward's (backward_core): a forward that is not differentiated does not
    pay for dphi/dc."""
    (x_seen, rx, sx), (w_seen, rw, sw) = _seen_rows(x, w)
    negatives = None
    if options.nontarget != "none":
        target_cos = target_cosines(x_seen, w_seen, labels, rx, rw, options.sub_centers)
        if merge is not None and merge_rows is None:  # a class shard alone would see 0 for others' targets
            raise NotImplementedError("a sharded forward with a non-target epilogue needs merge_rows")
        if merge_rows is not None:
            target_cos = merge_rows(target_cos)
        t = options.nontarget_t if update_t is None else update_t(target_cos, active)
        negatives = hard_negatives(options.nontarget, t, target_cos, active, options.m1, options.m2, options.m3)
        options = options.with_negatives(negatives)
    stats = get_backend(backend).forward(x_seen, w_seen, labels, options, RowNorms(rx, rw))
    if merge is not None:
        stats = merge(stats)
    loss, lse, gap = finalize(stats, active, options.label_smoothing, num_classes)
    return Forward(loss, stats, Saved(lse, gap, stats.target_cos, rx, rw, sx, sw, negatives))


class UnitGradients(NamedTuple):
    """The gradients of sum_i loss_i over the rows with a target (upstream gradient 1 there), in the
    compute dtype, made in forward (forward_with_gradients); None where not asked for. dx_i scales
    with each row's upstream gradient; dw is valid for an upstream gradient equal on every row
    with a target (a "mean" or "sum" reduction), times it."""

    dx: Tensor | None
    dw: Tensor | None


def forward_with_gradients(x: Tensor, w: Tensor, labels: Tensor, active: Tensor, options: LossOptions, backend: str,
                           num_classes: int, need_dx: bool, need_dw: bool, dw_dtype: torch.dtype):
    """(forward_stats' Forward, UnitGradients) from one walk that keeps its cosine tiles for the
    gradients: 3 GEMMs of 2NCD flops where forward + backward_core take 4 (the `torch` backend on a
    CPU, backends/row_blocks.py); None where the backend has no such walk for these inputs, or with
    a non-target epilogue, or where dw would not be in w's dtype (the caller runs forward_stats).
    The same overflow-safe rows as forward_stats; the walk finishes each row itself (finalize and
    backward_core's target gradient factor, per unit upstream gradient)."""
    walk = get_backend(backend).forward_with_gradients
    if walk is None or options.nontarget != "none" or (need_dw and dw_dtype != w.dtype):
        return None
    (x_seen, rx, sx), (w_seen, rw, sw) = _seen_rows(x, w)
    result = walk(x_seen, w_seen, labels, active, options, RowNorms(rx, rw), num_classes, need_dx, need_dw)
    if result is None:
        return None
    stats, loss, lse, gap, dx, dw = result
    # d/dv of a function of the seen rows s * v is s times the gradient with respect to them
    if dx is not None and sx is not None:
        dx.mul_(sx[:, None])
    if dw is not None and sw is not None:
        dw.mul_(sw[:, None])
    return Forward(loss, stats, Saved(lse, gap, stats.target_cos, rx, rw, sx, sw)), UnitGradients(dx, dw)


def _rows_seen(v: Tensor, scale: Tensor | None, headroom: bool):
    """The rows a backend saw in forward (common.overflow_safe_rows), or None where it saw v. With
    the sync-free rule (a GPU), as there with no host read: the embeddings' scaled copy again (the
    same kernel, the same bits), the class rows as given."""
    if scale is None:
        return None
    if common.sync_free_rule(v, scale.dtype):
        if not common.headroom_scaled(v.dtype, scale.dtype, headroom):
            return None
        return common.overflow_safe_rows(v, scale.dtype, sync_free=True, headroom=True)[0]
    if not bool((scale != 1).any()):  # the host read (the CPU)
        return None
    return v * scale[:, None].to(v.dtype)


def backward_core(grad_rows: Tensor, x: Tensor, w: Tensor, labels: Tensor, saved: Saved, options: LossOptions,
                  backend: str, num_classes: int, dw_dtype: torch.dtype):
    """(dx in the compute dtype, dw in dw_dtype) of operands x, w, given what forward_stats saved.
    grad_rows: (N,) in the compute dtype, 0 on ignored rows. dw is rounded once into dw_dtype
    (the master weight's dtype): to nearest, inf on overflow."""
    x_seen, w_seen = _rows_seen(x, saved.sx, headroom=True), _rows_seen(w, saved.sw, headroom=False)
    # grad_rows is 0 exactly on the rows without a target (and wherever it is 0 the factor is not needed)
    factor = target_cosine_gradient(saved.gap, saved.target_cos, grad_rows != 0, options, num_classes)
    target_dcos = grad_rows * factor
    # Huge class rows seen scaled (only where the norm pass read the values: the CPU): dw in the
    # compute dtype, scaled, then rounded once. On a GPU class rows are seen as given.
    dw_out = dw_dtype if w_seen is None else compute_dtype(x.dtype)
    dx, dw = get_backend(backend).backward(
        grad_rows, x if x_seen is None else x_seen, w if w_seen is None else w_seen, labels, saved.lse, target_dcos,
        options.with_negatives(saved.negatives), num_classes, RowNorms(saved.rx, saved.rw), dw_out)
    # d/dv of a function of the seen rows s * v is s times the gradient with respect to them.
    if x_seen is not None:
        dx = dx * saved.sx[:, None]
    if w_seen is not None:
        dw = (dw * saved.sw[:, None]).to(dw_dtype)
    return dx, dw


def _scale_or_ones(scale, n, dtype, device):
    return torch.ones(n, dtype=dtype, device=device) if scale is None else scale


def _targets(labels: Tensor, ignore_index: int) -> Tensor:
    return torch.where(labels == ignore_index, -1, labels.long())


def _margin_softmax_fwd(
    embeddings: Tensor, weight: Tensor, labels: Tensor, m1: Tensor, m2: Tensor, m3: Tensor,
    options: list[float], backend: str, operand_dtype: torch.dtype, nontarget_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns loss_rows (0 on ignored rows), lse, target_cos (compute dtype), int64 top-1 class,
    and for backward the precise gap (finalize), the inverse norms rx, rw of the rows the backend
    saw, the power-of-two scales sx, sw that made those rows from the given ones (1 for all but
    huge rows) and the non-target epilogue's per-row threshold (empty without one)."""
    return _forward_outputs(embeddings, weight, labels, m1, m2, m3, options, backend, operand_dtype, nontarget_t)


def _forward(embeddings, weight, labels, m1, m2, m3, options, backend, operand_dtype, nontarget_t=None,
             need_dx=False, need_dw=False):
    """(Forward, UnitGradients or None) of the op's inputs: with need_dx or need_dw, the gradients
    too where the backend makes them in forward (forward_with_gradients)."""
    opts = LossOptions.unflatten(options, m1, m2, m3, nontarget_t)
    num_classes = weight.shape[0] // opts.sub_centers
    labels = _target_labels(labels, opts.ignore_index, num_classes)
    with autocast_off(embeddings.device.type):
        x, w = operands(embeddings, operand_dtype), operands(weight, operand_dtype)
        both = None
        if need_dx or need_dw:
            both = forward_with_gradients(x, w, labels, labels >= 0, opts, backend, num_classes, need_dx, need_dw,
                                          weight.dtype)
        return both or (forward_stats(x, w, labels, labels >= 0, opts, backend, num_classes), None)


def _user_outputs(fwd: Forward):
    """The op's outputs a caller reads (fused_loss_rows): loss rows, lse, target_cos, top-1; the
    target cosines a copy of the saved ones (a caller's in-place change must not reach backward)."""
    return fwd.loss, fwd.saved.lse, fwd.stats.target_cos.clone(), fwd.stats.best_class


def _forward_outputs(embeddings, weight, labels, m1, m2, m3, options, backend, operand_dtype, nontarget_t=None):
    """_margin_softmax_fwd's ten outputs: the custom op's schema returns what backward reads too."""
    fwd, _ = _forward(embeddings, weight, labels, m1, m2, m3, options, backend, operand_dtype, nontarget_t)
    dtype, saved, device = compute_dtype(operand_dtype), fwd.saved, embeddings.device
    threshold = torch.empty(0, dtype=dtype, device=device) if saved.negatives is None else saved.negatives.threshold
    loss, lse, target_cos, best_class = _user_outputs(fwd)
    # outputs of a custom op alias neither its inputs nor each other
    return (loss, lse, target_cos, best_class.clone(), saved.gap, saved.rx, saved.rw,
            _scale_or_ones(saved.sx, embeddings.shape[0], dtype, device),
            _scale_or_ones(saved.sw, weight.shape[0], dtype, device), threshold)


margin_softmax_fwd = torch.library.custom_op("arcface_kernels::margin_softmax_fwd", _margin_softmax_fwd,
                                             mutates_args=())


@margin_softmax_fwd.register_fake
def _(embeddings, weight, labels, m1, m2, m3, options, backend, operand_dtype, nontarget_t=None):
    n, dtype = embeddings.shape[0], compute_dtype(operand_dtype)
    row = embeddings.new_empty((n,), dtype=dtype)
    class_row = weight.new_empty((weight.shape[0],), dtype=dtype)
    threshold = row.clone() if nontarget_t is not None else row.new_empty(0)
    return (row, row.clone(), row.clone(), embeddings.new_empty((n,), dtype=torch.int64), row.clone(), row.clone(),
            class_row, row.clone(), class_row.clone(), threshold)


@torch.library.custom_op("arcface_kernels::margin_softmax_bwd", mutates_args=())
def margin_softmax_bwd(
    grad_rows: Tensor, embeddings: Tensor, weight: Tensor, labels: Tensor, m1: Tensor, m2: Tensor, m3: Tensor,
    lse: Tensor, gap: Tensor, target_cos: Tensor, rx: Tensor, rw: Tensor, sx: Tensor, sw: Tensor, options: list[float],
    backend: str, operand_dtype: torch.dtype, nontarget_t: Tensor | None = None, threshold: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    opts = LossOptions.unflatten(options, m1, m2, m3, nontarget_t)
    num_classes = weight.shape[0] // opts.sub_centers
    labels = _targets(labels, opts.ignore_index)
    # loss.backward() may run inside the autocast region: the backend computes in its own dtypes.
    with autocast_off(embeddings.device.type):
        x, w = operands(embeddings, operand_dtype), operands(weight, operand_dtype)
        grad_rows = torch.where(labels >= 0, grad_rows.to(lse.dtype), 0.0)
        negatives = None if nontarget_t is None else HardNegatives(threshold, coefficients(opts.nontarget,
                                                                                          nontarget_t))
        saved = Saved(lse, gap, target_cos, rx, rw, sx, sw, negatives)
        dx, dw = backward_core(grad_rows, x, w, labels, saved, opts, backend, num_classes, weight.dtype)
    return dx.to(embeddings.dtype), dw


@margin_softmax_bwd.register_fake
def _(grad_rows, embeddings, weight, labels, m1, m2, m3, lse, gap, target_cos, rx, rw, sx, sw, options, backend,
      operand_dtype, nontarget_t=None, threshold=None):
    return torch.empty_like(embeddings), torch.empty_like(weight)


def _save(ctx, inputs, lse, gap, target_cos, rx, rw, sx, sw, threshold):
    """What _backward reads, for the custom op and _EagerForward alike (sx, sw, threshold may be
    None in the latter: every row seen as given, no non-target epilogue)."""
    embeddings, weight, labels, m1, m2, m3, options, backend, operand_dtype, *nontarget_t = inputs
    ctx.settings = (options, backend, operand_dtype)
    ctx.save_for_backward(embeddings, weight, labels, m1, m2, m3, lse, gap, target_cos, rx, rw, sx, sw,
                          *nontarget_t, threshold)
    ctx.nontarget = bool(nontarget_t) and nontarget_t[0] is not None


def _setup_context(ctx, inputs, output):
    loss, lse, target_cos, top1, gap, rx, rw, sx, sw, threshold = output
    # Reported, not differentiated: api.py makes a loss built on them raise (in eager mode).
    ctx.mark_non_differentiable(lse, target_cos, top1, gap, rx, rw, sx, sw, threshold)
    _save(ctx, inputs, lse, gap, target_cos, rx, rw, sx, sw, threshold)


def _backward(ctx, grad_loss, *grad_reported):
    embeddings, weight, labels, m1, m2, m3, lse, gap, target_cos, rx, rw, sx, sw, *nontarget = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    opts = LossOptions.unflatten(ctx.settings[0], m1, m2, m3)
    unit, ctx.unit_gradients = getattr(ctx, "unit_gradients", None), None  # a second backward recomputes
    if torch.is_grad_enabled():  # create_graph=True: the backward op, whose own backward refuses by name
        unit = None
    scaled = None if unit is None else _scaled_unit_gradients(unit, grad_loss, labels, opts.ignore_index, embeddings)
    if scaled is not None:
        dx, dw = scaled
    else:
        # the non-target epilogue's t and per-row threshold, when forward had one
        epilogue = nontarget[-2:] if ctx.nontarget else ()
        # _EagerForward saves no scales for rows seen as given (the op's schema wants tensors)
        sx = _scale_or_ones(sx, embeddings.shape[0], lse.dtype, lse.device)
        sw = _scale_or_ones(sw, weight.shape[0], lse.dtype, lse.device)
        dx, dw = margin_softmax_bwd(grad_loss, embeddings, weight, labels, m1, m2, m3, lse, gap, target_cos, rx, rw,
                                    sx, sw, *ctx.settings, *epilogue)
    d_m2 = d_m3 = None
    if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:  # per-row margins that require grad (MagFace)
        active = labels != opts.ignore_index
        grad_rows = torch.where(active, grad_loss.to(lse.dtype), 0.0)
        d_m2, d_m3 = margin_gradients(grad_rows, gap, target_cos, active, opts, weight.shape[0] // opts.sub_centers)
    return (dx, dw, None, None, d_m2, d_m3, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 9)


def _scaled_unit_gradients(unit: UnitGradients, grad_loss: Tensor, labels: Tensor, ignore_index: int,
                           embeddings: Tensor):
    """(dx, dw) from the gradients forward made (eager CPU calls), or None where the upstream
    gradient differs between rows with a target (then dw is not a multiple of the unit one: the
    caller runs the backward op). dx_i = g_i dx_unit_i; dw = g dw_unit, in place. A host read of
    g, on the CPU."""
    low, high = (float(v) for v in torch.aminmax(grad_loss))  # the loss rows' dtype: the compute dtype, as unit's
    if low == high and math.isfinite(low):
        # one g on every row, what "mean" and "sum" send: a scalar (dx_unit is 0 on the rows
        # without a target, where the general form multiplies by g_i = 0)
        return (None if unit.dx is None else unit.dx.mul_(low).to(embeddings.dtype),
                None if unit.dw is None else unit.dw.mul_(low))
    active = labels != ignore_index
    g = torch.where(active, grad_loss, 0.0)
    g_active = g[active]
    if unit.dw is not None and g_active.numel() and not bool((g_active == g_active[0]).all()):
        return None
    dx = None if unit.dx is None else unit.dx.mul_(g[:, None]).to(embeddings.dtype)
    dw = None if unit.dw is None else unit.dw.mul_(g_active[0] if g_active.numel() else 0.0)
    return dx, dw


# Only the loss rows are differentiated; the stats, the norms and the scales are reported.
torch.library.register_autograd("arcface_kernels::margin_softmax_fwd", _backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise NotImplementedError(
        "margin_softmax_loss is differentiable once: its gradient (from backward with create_graph=True) "
        "cannot be differentiated again (double backward, gradient penalties on the head, hessians)."
    )


torch.library.register_autograd("arcface_kernels::margin_softmax_bwd", _refuse_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


class _EagerForward(torch.autograd.Function):
    """margin_softmax_fwd for eager calls on the CPU: the same implementation, saved tensors and
    backward (the margin_softmax_bwd op, which refuses double backward), without the custom op's
    own layers (its dispatch to a Python autograd kernel and back): about a tenth of a small
    call's fixed cost there (docs/backends/torch.md, "Fixed cost per call"). It returns the four
    outputs a caller reads; what the op's schema returns for backward alone is saved directly.
    torch.compile traces the custom op (it needs the fake implementation); on a GPU the op is
    kept, its launch list being the one bench/cost_model.py models."""

    @staticmethod
    def forward(ctx, *inputs):
        # only the loss rows are differentiated: autograd need not fill the three reported outputs'
        # gradients with zeros (_backward takes None for each, the loss's included)
        ctx.set_materialize_grads(False)
        # with gradients to come, the backend may make them now from the same tiles (3 GEMMs, not 4)
        fwd, ctx.unit_gradients = _forward(*inputs, need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        output = _user_outputs(fwd)
        ctx.mark_non_differentiable(*output[1:])
        saved = fwd.saved
        # what the custom op returns for backward only is saved, not returned (fewer outputs, no
        # tensors of ones for unscaled rows: a small head's fixed cost)
        _save(ctx, inputs, saved.lse, saved.gap, saved.target_cos, saved.rx, saved.rw, saved.sx, saved.sw,
              None if saved.negatives is None else saved.negatives.threshold)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def fused_loss_rows(embeddings: Tensor, weight: Tensor, labels: Tensor, options: LossOptions, backend: str,
                    operand_dtype: torch.dtype):
    """The op: (loss_rows, lse, target_cos, top1), the first differentiable.

    embeddings (N, D) and weight (C * K, D) as the user holds them, each float16, bfloat16,
    float32 or float64 and contiguous; operand_dtype: the dtype the op computes on (the autocast
    dtype, or the inputs' common dtype). Each gradient comes back in its input's dtype. labels:
    int64 (N,), each in [0, C) or equal to options.ignore_index (ignored rows; the op maps them
    to -1 and raises ValueError on any other label). options: margins as (N,) tensors in the
    compute dtype (LossOptions.for_rows). backend: a resolved fused backend name."""
    eager_cpu = embeddings.device.type == "cpu" and not torch.compiler.is_compiling()
    epilogue = () if options.nontarget_t is None else (options.nontarget_t,)
    inputs = (embeddings, weight, labels, options.m1, options.m2, options.m3, options.flatten(), backend,
              operand_dtype, *epilogue)
    if not eager_cpu:
        return margin_softmax_fwd(*inputs)[:4]
    if torch.is_grad_enabled():
        return _EagerForward.apply(*inputs)
    # without grad mode the autograd.Function would still see needs_input_grad (and make gradients)
    return _user_outputs(_forward(*inputs)[0])
