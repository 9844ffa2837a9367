"""Model-parallel margin loss: the classes are sharded across ranks (torch.distributed).

Each rank holds a contiguous shard of the class centres. Per step:

forward   all-gather the rows (embeddings, labels, per-row margins; batch sizes may differ),
          with a non-target epilogue (negatives.py) sum the rows' target cosines over the shards
          (only the owner of a label has a nonzero one) so every shard forms the same threshold,
          compute this shard's PartialStats with a fused backend (no N x C), and merge them
          across ranks: all-reduce max of the row maxima, sum of the rescaled sum-exps, sums of
          the target terms (only the owner of a label contributes), all-gather of the best
          cosines. Every rank then knows the global log-sum-exp of every row.
backward  all-gather the upstream row gradients, run the backend's backward against the
          global lse: dW of the shard is local, dX of all rows is a partial sum that an
          all-reduce adds up; each rank keeps its own rows. Per-row margins that require grad
          (MagFace) get d loss / d m2, d m3 of this rank's rows from the saved O(N) values
          (op.margin_gradients, docs/design.md eq. (17a)).

Global-batch statistics: ShardedAdaFaceLoss takes AdaFace's batch_mean / batch_std over every
rank's rows (two all-reduces of O(1) values), ShardedCurricularFaceLoss CurricularFace's t over
the merged target cosines of the global batch (inside the forward, before the threshold is
formed), so W ranks give the single-process result on the concatenated batch.

Communication per step, for N rows in all, D features, W ranks (b bytes per element of the
input dtype): all-gather of N x D embeddings (N*D*b), a few all-reduces and all-gathers of
O(N) statistics, and the all-reduce of the N x D float32 dX partials (N*D*4) in backward:
O(N * D), never O(N * C).

Partial FC (`sample_rate < 1`, as insightface's PartialFC v2): every step each rank keeps the
classes of its shard that are targets of any row in the global batch and samples the rest
(partial_fc.py, one sampler per rank) until it has ceil(sample_rate * shard size) classes; the
loss is the margin softmax over the sampled classes only (label smoothing spreads eps over
them). The weight stays one Parameter and the sampled rows are indexed out of it, so unsampled
rows get an exact zero gradient: plain SGD leaves them unchanged, while momentum and weight
decay still move them, which is what insightface's PartialFC v2 does with its SGD optimizer.

Under DistributedDataParallel (docs/ddp.md) the backbone's gradients are averaged over the W
ranks, while this loss's per-rank parts add up to the global loss: ShardedMarginLoss therefore
multiplies the embeddings' gradient by W (ddp_backbone=True), so that the averaged backbone
gradient equals a single-process run on the concatenated batch, as with insightface.
"""

import torch
import torch.distributed as dist
from torch import nn

from . import op
from .api import reduce_rows, stats_without_gradient
from .backends import PartialStats, resolve_backend
from .entry import prepare_loss_inputs
from .heads import filtering_options
from .margin_heads import AdaFaceMargins, CurricularFaceT
from .margins import CLIP_EPS
from .negatives import NONTARGET_MODES
from .options import LossOptions, make_options
from .partial_fc import ClassSampler, class_rows
from .validation import boolean, check_tensors, fraction, integer, invalid_labels, label_error, positive_int

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def shard_bounds(num_classes, world_size, rank):
    """[start, stop) of the classes owned by `rank`: the first C % W ranks get one more."""
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} must be at least the world size {world_size}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _gather_rows(tensor, sizes, group):
    """All-gather tensors whose first dimension differs per rank (padded to the largest)."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _gather_counts(value, device, group):
    """An int from every rank, as a list in rank order."""
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


def _all_reduce(tensor, op_, group):
    dist.all_reduce(tensor, op=op_, group=group)
    return tensor


def _check_agreement(embeddings, weight_shard, labels, options, num_classes, class_offset, group):
    """Every rank must use the same settings and the shards must tile [0, C); labels in range.
    Raises the same ValueError on every rank (never a hang in a later collective)."""
    k, ignore_index = options.sub_centers, options.ignore_index
    local_classes = weight_shard.shape[0] // k
    bad_labels = invalid_labels(labels, ignore_index, num_classes)
    fingerprint = torch.tensor(
        [options.scale, k, options.easy_margin, options.straight_through, options.label_smoothing, num_classes,
         ignore_index, embeddings.shape[1], _DTYPE_CODES[embeddings.dtype], class_offset, local_classes,
         float(bad_labels.any()), embeddings.shape[0], options.clip or 0.0, NONTARGET_MODES.index(options.nontarget)],
        dtype=torch.float64, device=embeddings.device)
    # the non-target map's t (a 0-d tensor after for_rows), read in the same gather as the rest
    t = options.nontarget_t if options.nontarget_t is not None else torch.zeros(())
    fingerprint = torch.cat([fingerprint, t.reshape(1).to(fingerprint)])
    parts = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, fingerprint, group=group)
    table = torch.stack(parts).cpu()
    names = ("scale", "sub_centers", "easy_margin", "margin_grad", "label_smoothing", "num_classes",
             "ignore_index", "embedding size D", "dtype")
    for col, name in enumerate(names):
        if not torch.all(table[:, col] == table[0, col]):
            raise ValueError(f"ranks disagree on {name}: {table[:, col].tolist()}")
    if not torch.all(table[:, 13] == table[0, 13]):  # 0: fallback="threshold"
        raise ValueError(f"ranks disagree on fallback / clip_eps: {table[:, 13].tolist()}")
    for col, name in ((14, "nontarget"), (15, "nontarget_t")):
        if not torch.all(table[:, col] == table[0, col]):
            raise ValueError(f"ranks disagree on {name}: {table[:, col].tolist()}")
    offsets, counts = table[:, 9].long().tolist(), table[:, 10].long().tolist()
    expected = [sum(counts[:r]) for r in range(len(counts))]
    if offsets != expected or sum(counts) != num_classes:
        raise ValueError(
            f"class shards must be contiguous in rank order and cover num_classes={num_classes}: "
            f"offsets {offsets}, sizes {counts}")
    if table[:, 11].any():
        bad_ranks = torch.nonzero(table[:, 11]).flatten().tolist()
        raise label_error(ignore_index, num_classes, f"ranks {bad_ranks} have labels outside")
    return table[:, 12].long().tolist()


def _merge_stats(stats: PartialStats, class_offset, group):
    """Global statistics of every row from each shard's partials (docs/design.md eq. (14)): the
    non-target sum merges like sum_exp, so op.finalize keeps a confident row's precision."""
    global_max = _all_reduce(stats.row_max.clone(), dist.ReduceOp.MAX, group)
    rescale = torch.exp(stats.row_max - global_max)
    sums = torch.stack([stats.sum_exp * rescale, stats.nontarget_sum_exp * rescale, stats.target_logit,
                        stats.logit_sum, stats.target_cos])
    sum_exp, nontarget_sum_exp, target_logit, logit_sum, target_cos = _all_reduce(sums, dist.ReduceOp.SUM, group)
    world = dist.get_world_size(group)
    best_cos = [torch.empty_like(stats.best_cos) for _ in range(world)]
    best_class = [torch.empty_like(stats.best_class) for _ in range(world)]
    dist.all_gather(best_cos, stats.best_cos.contiguous(), group=group)
    dist.all_gather(best_class, (stats.best_class + class_offset).contiguous(), group=group)
    # argmax returns the first maximum: the lowest rank, so the lowest class on ties.
    winner = torch.stack(best_cos).argmax(dim=0)
    top1 = torch.stack(best_class).gather(0, winner[None])[0]
    return PartialStats(global_max, sum_exp, target_logit, logit_sum, target_cos,
                        torch.stack(best_cos).max(dim=0).values, top1, nontarget_sum_exp)


class _ShardedMarginSoftmax(torch.autograd.Function):
    """The op's forward and backward cores (op.forward_stats, op.backward_core) on the gathered
    rows and this rank's class shard, with the partial statistics merged across ranks: the same
    overflow-safe rows, precise loss and target gradient, and exact-or-inf gradients. m2, m3 are
    inputs (the per-row margins of options, for their gradient); t_update, when given, moves a
    running non-target t from the merged target cosines before the threshold uses it."""

    @staticmethod
    def forward(ctx, embeddings, weight_shard, labels, m2, m3, options, num_classes, class_offset, sizes, backend,
                group, embedding_grad_scale, operand_dtype, t_update):
        rank = dist.get_rank(group)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        all_labels = _gather_rows(labels, sizes, group)         # -1 on ignored rows
        # the gathered per-row margins, not validated again (replace() would re-validate and turn
        # the 0-d nontarget_t back into a float)
        options = options.derived(**{m: _gather_rows(v.detach(), sizes, group)
                                     for m, v in (("m1", options.m1), ("m2", m2), ("m3", m3))})
        local_classes = weight_shard.shape[0] // options.sub_centers
        owned = (all_labels >= class_offset) & (all_labels < class_offset + local_classes)
        shard_labels = torch.where(owned, all_labels - class_offset, -1)
        # the backend computes in its own dtypes: autocast must not recast its matmuls
        with torch.autocast(embeddings.device.type, enabled=False):
            all_x = _gather_rows(op.operands(embeddings.detach(), operand_dtype), sizes, group)
            w = op.operands(weight_shard.detach(), operand_dtype)
            fwd = op.forward_stats(all_x, w, shard_labels, all_labels >= 0, options, backend, num_classes,
                                   merge=lambda stats: _merge_stats(stats, class_offset, group),
                                   merge_rows=lambda cos: _all_reduce(cos, dist.ReduceOp.SUM, group),
                                   update_t=t_update)
        ctx.save_for_backward(all_x, weight_shard, shard_labels, all_labels)
        ctx.saved = fwd.saved
        ctx.settings = (options, num_classes, sizes, rows, backend, group, embeddings.dtype, embedding_grad_scale,
                        operand_dtype)
        outputs = (fwd.loss[rows], fwd.saved.lse[rows].clone(), fwd.stats.target_cos[rows].clone(),
                   fwd.stats.best_class[rows].clone())
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.margin_grads = (m2.requires_grad, m3.requires_grad)
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        all_x, weight_shard, shard_labels, all_labels = ctx.saved_tensors
        options, num_classes, sizes, rows, backend, group, x_dtype, embedding_grad_scale, operand_dtype = ctx.settings
        lse = ctx.saved.lse
        grad_all = _gather_rows(grad_loss.to(lse.dtype).contiguous(), sizes, group)
        grad_all = torch.where(all_labels >= 0, grad_all, 0.0)
        with torch.autocast(all_x.device.type, enabled=False):
            dx_all, dw = op.backward_core(grad_all, all_x, op.operands(weight_shard, operand_dtype), shard_labels,
                                          ctx.saved, options, backend, num_classes, weight_shard.dtype)
        dx_all = _all_reduce(dx_all.contiguous(), dist.ReduceOp.SUM, group)
        d_m2 = d_m3 = None
        if any(ctx.margin_grads):  # per-row margins that require grad (MagFace): this rank's rows
            d_m2, d_m3 = op.margin_gradients(grad_all, ctx.saved.gap, ctx.saved.target_cos, all_labels >= 0, options,
                                             num_classes)
            # a per-row margin is a function of its row (MagFace's |x|): its gradient reaches the
            # backbone too, so it takes the embeddings' DDP correction
            d_m2, d_m3 = d_m2[rows] * embedding_grad_scale, d_m3[rows] * embedding_grad_scale
        # rounded once into the embeddings' dtype: inf where it overflows, never clamped
        return ((dx_all[rows] * embedding_grad_scale).to(x_dtype), dw, None, d_m2, d_m3) + (None,) * 9


def sharded_margin_softmax_loss(embeddings, weight_shard, labels, *, class_offset, num_classes,
                                scale=64.0, m1=1.0, m2=0.5, m3=0.0, sub_centers=1, easy_margin=False,
                                fallback="threshold", clip_eps=CLIP_EPS, margin_grad="exact", nontarget="none",
                                nontarget_t=0.0, label_smoothing=0.0, ignore_index=-100, reduction="mean",
                                return_stats=False, process_group=None, backend="auto"):
    """The margin-softmax loss of this rank's rows against classes sharded over the group.

    weight_shard holds the rows of classes [class_offset, class_offset + shard classes); labels
    are global class indices. Reductions: "mean" divides this rank's sum by the number of
    non-ignored rows over all ranks, so that the sum over ranks of the returned losses (and of
    their gradients) equals the single-process loss on the concatenated batch; "sum" returns this
    rank's sum; "none" its rows. Every rank must call it (it runs collectives). Per-row m2, m3
    (this rank's rows) may require grad; nontarget / nontarget_t as margin_softmax_loss's.
    """
    options = LossOptions(scale=scale, m1=m1, m2=m2, m3=m3, sub_centers=sub_centers, easy_margin=easy_margin,
                          fallback=fallback, clip_eps=clip_eps, margin_grad=margin_grad, nontarget=nontarget,
                          nontarget_t=nontarget_t, label_smoothing=label_smoothing, ignore_index=ignore_index,
                          reduction=reduction)
    return sharded_loss_from_options(embeddings, weight_shard, labels, options, class_offset=class_offset,
                                     num_classes=num_classes, return_stats=return_stats,
                                     process_group=process_group, backend=backend)


def sharded_loss_from_options(embeddings, weight_shard, labels, options: LossOptions, *, class_offset, num_classes,
                              return_stats=False, process_group=None, backend="auto", embedding_grad_scale=1.0,
                              t_update=None):
    """sharded_margin_softmax_loss with its settings in a LossOptions; the embeddings' gradient
    is multiplied by embedding_grad_scale (ShardedMarginLoss's DDP correction). t_update(target_cos,
    active) -> t: a running non-target t moved from the global batch's target cosines
    (ShardedCurricularFaceLoss; op.forward_stats' update_t)."""
    return_stats = boolean("return_stats", return_stats)
    inputs = prepare_loss_inputs(embeddings, weight_shard, labels, options)
    dtype, labels, options = inputs.operand_dtype, inputs.labels, inputs.options
    ignore_index, reduction = options.ignore_index, options.reduction
    num_classes, class_offset = positive_int("num_classes", num_classes), integer("class_offset", class_offset)
    group = process_group if process_group is not None else dist.group.WORLD
    sizes = _check_agreement(embeddings, weight_shard, labels, options, num_classes, class_offset, group)
    name = resolve_backend(backend, embeddings.device, dtype)
    if name == "reference":
        name = "torch"  # the reference materializes N x C; the sharded path needs partial statistics
    targets = torch.where(labels == ignore_index, -1, labels)
    rows, lse, target_cos, top1 = _ShardedMarginSoftmax.apply(
        embeddings.contiguous(), weight_shard.contiguous(), targets, options.m2, options.m3, options, num_classes,
        class_offset, sizes, name, group, float(embedding_grad_scale), dtype, t_update)
    if reduction == "mean":  # over the non-ignored rows of every rank
        active = _all_reduce((targets >= 0).sum().to(rows.dtype), dist.ReduceOp.SUM, group)
        loss = rows.sum() / active.clamp_min(1)
    else:
        loss = reduce_rows(rows, targets >= 0, reduction)
    if return_stats:
        return loss, stats_without_gradient(embeddings, weight_shard, lse, target_cos, top1)
    return loss


class ShardedMarginLoss(nn.Module):
    """A margin-softmax head whose class centres are sharded over a process group.

    This rank's `weight` holds the rows of classes [class_start, class_stop) (shard_bounds, the
    same split as insightface's PartialFC_V2, so its state_dict loads theirs: compat/insightface.py).
    `loss = head(embeddings, labels)` with this rank's rows and global labels; this rank's loss
    is its share of the global batch's loss (all_reduce the values for the batch loss).
    ddp_backbone=True (default) multiplies the embeddings' gradient by the world size, for a
    backbone wrapped in DistributedDataParallel, which averages over ranks (docs/ddp.md); pass
    False when the backbone's gradients are summed instead. With sample_rate < 1 each training
    step uses Partial FC sampling (module docstring); eval mode uses every class.
    interclass_filtering_threshold: insightface's filtering, as CombinedMarginLoss's.
    """

    def __init__(self, num_classes, embedding_size, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0, sub_centers=1,
                 process_group=None, sample_rate=1.0, seed=0, ddp_backbone=True, interclass_filtering_threshold=0.0,
                 backend="auto", device=None, dtype=None, **loss_options):
        super().__init__()
        owner = type(self).__name__
        self.options = make_options(owner, scale=scale, m1=m1, m2=m2, m3=m3, sub_centers=sub_centers,
                                    **filtering_options(interclass_filtering_threshold, loss_options))
        num_classes, embedding_size = positive_int("num_classes", num_classes), positive_int(
            "embedding_size", embedding_size)
        self.group = process_group if process_group is not None else dist.group.WORLD
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.class_start, self.class_stop = shard_bounds(num_classes, world, rank)
        self.num_classes, self.embedding_size, self.sub_centers = num_classes, embedding_size, self.options.sub_centers
        self.sample_rate = fraction("sample_rate", sample_rate)
        ddp_backbone = boolean("ddp_backbone", ddp_backbone)
        self.embedding_grad_scale = float(world) if ddp_backbone else 1.0
        self.backend = backend
        local_rows = (self.class_stop - self.class_start) * sub_centers
        self.weight = nn.Parameter(torch.empty(local_rows, embedding_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)
        # Distinct, reproducible negative samples per rank and step.
        self.sampler = ClassSampler(sample_rate, seed * 1_000_003 + rank) if sample_rate < 1 else None
        self.sampled_classes = None  # global indices of the classes used by the last step

    def forward(self, embeddings, labels, *, return_stats=False, backend=None, t_update=None, **overrides):
        """This rank's share of the loss; `overrides` change some settings for this call (per-row
        m2, m3 of this rank's rows, nontarget_t), t_update as sharded_loss_from_options'."""
        options = self.options.replace(f"{type(self).__name__}.forward()", **overrides) if overrides else self.options
        common = dict(return_stats=return_stats, process_group=self.group,
                      backend=self.backend if backend is None else backend,
                      embedding_grad_scale=self.embedding_grad_scale, t_update=t_update)
        if self.sampler is None or not self.training:
            return sharded_loss_from_options(embeddings, self.weight, labels, options,
                                             class_offset=self.class_start, num_classes=self.num_classes, **common)
        labels = check_tensors(embeddings, self.weight, labels, self.sub_centers)  # the label rule, before sampling
        classes, remapped, counts = self._sample(labels, self.options.ignore_index)
        rank = dist.get_rank(self.group)
        self.sampled_classes = classes + self.class_start
        # Renumbered labels are >= 0, so -1 can mark the ignored rows whatever ignore_index was.
        out = sharded_loss_from_options(embeddings, self.weight[class_rows(classes, self.sub_centers)], remapped,
                                        options.replace(ignore_index=-1), class_offset=sum(counts[:rank]),
                                        num_classes=sum(counts), **common)
        if return_stats:
            loss, stats = out
            every_class = _gather_rows(self.sampled_classes, counts, self.group)
            return loss, stats._replace(top1=every_class[stats.top1])
        return out

    def _sample(self, labels, ignore_index):
        """This shard's sampled classes (local indices, sorted), this rank's labels renumbered into
        the concatenation of every rank's sampled classes (-1 where ignored), and every rank's
        number of sampled classes."""
        device = labels.device
        sizes = _gather_counts(labels.shape[0], device, self.group)
        all_labels = _gather_rows(labels, sizes, self.group)
        ignored = all_labels == ignore_index
        if torch.any(invalid_labels(all_labels, ignore_index, self.num_classes)):
            # every rank sees the same gathered labels, so every rank raises
            raise label_error(ignore_index, self.num_classes, "some rank has labels outside")
        local = self.class_stop - self.class_start
        mine = ~ignored & (all_labels >= self.class_start) & (all_labels < self.class_stop)
        is_positive = torch.zeros(local, dtype=torch.bool, device=device)
        is_positive[all_labels[mine] - self.class_start] = True
        classes = self.sampler(is_positive)
        counts = _gather_counts(len(classes), device, self.group)
        rank = dist.get_rank(self.group)
        # The owner of each label knows its new index; the other ranks add 0.
        position = torch.searchsorted(classes, (all_labels - self.class_start).clamp(0, local - 1))
        new_index = torch.where(mine, position + sum(counts[:rank]), 0)
        new_index = _all_reduce(new_index, dist.ReduceOp.SUM, self.group)
        new_index = torch.where(ignored, -1, new_index)
        start = sum(sizes[:rank])
        return classes, new_index[start : start + labels.shape[0]], counts


class ShardedAdaFaceLoss(AdaFaceMargins, ShardedMarginLoss):
    """AdaFaceLoss (margin_heads.py, same settings and buffers) with its classes sharded over a
    process group, as ShardedMarginLoss: batch_mean / batch_std move with the mean and std of the
    clipped norms of the global batch (every rank's rows: margin_heads.batch_moments over the
    group), so every rank holds the same buffers, those of one process on the concatenated batch."""


class ShardedCurricularFaceLoss(CurricularFaceT, ShardedMarginLoss):
    """CurricularFaceLoss (margin_heads.py, same settings and buffer t) with its classes sharded
    over a process group, as ShardedMarginLoss: in training mode t moves from the mean target
    cosine of the global batch, inside the forward once the shards' target cosines are merged
    (op.forward_stats' update_t), and then the batch uses it: every rank holds the same t, that of
    one process on the concatenated batch."""

    def forward(self, embeddings, labels, *, return_stats=False, backend=None):
        t_update = self.moved_t if self.training else None
        return super().forward(embeddings, labels, return_stats=return_stats, backend=backend, t_update=t_update,
                               nontarget_t=self.t[0])
