"""The margin-family heads (issue 18) on the fused op: AdaFace, ElasticFace and MagFace (adaptive
margins), CurricularFace and MV-Softmax (the non-target epilogue, negatives.py).

Each head computes its per-row margins (N,) or its non-target parameter from the raw embeddings
(and running buffers), then goes through CombinedMarginLoss.forward, the one entry pipeline, as
overrides: nothing here touches N x C. Settings are named as the authors name them; weight is
(num_classes * sub_centers, embedding_size) and the heads take raw (unnormalized) embeddings.
Where the authors' code differs from the op's rules, the class docstring says so (README,
"Margin-family heads"; docs/design.md section 3, "The adaptive-margin heads").
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .api import reduce_rows
from .dtypes import compute_dtype
from .heads import CombinedMarginLoss
from .margins import CLIP_EPS
from .negatives import head_target_cosines
from .validation import _choice, _real, boolean, check_labels, check_rows, check_tensors, operand_dtype, target_labels


def _norms(embeddings):
    """|x_i| in the compute dtype (with autograd history)."""
    check_rows(embeddings, embeddings, 1)  # a named error before the margins read the rows
    return embeddings.to(compute_dtype(embeddings.dtype)).norm(dim=1)


def batch_moments(values, group=None):
    """Mean and unbiased std of `values` (N,) as torch's mean() and std(); with a process group,
    over the concatenation of every rank's values (two all-reduces of O(1) numbers, no host read):
    the sharded heads' global-batch statistics."""
    if group is None:
        return values.mean(), values.std()
    sums = torch.stack([torch.full_like(values[:1], values.shape[0])[0], values.sum()])
    dist.all_reduce(sums, group=group)
    count, total = sums.unbind(0)
    mean = total / count
    squares = ((values - mean) ** 2).sum()
    dist.all_reduce(squares, group=group)
    return mean, (squares / (count - 1)).sqrt()


class AdaFaceMargins:
    """AdaFace's settings, buffers and margins, for a head class that also derives from
    CombinedMarginLoss (AdaFaceLoss) or distributed.ShardedMarginLoss (ShardedAdaFaceLoss, whose
    `group` makes the statistics those of the global batch)."""

    def __init__(self, num_classes, embedding_size, *, scale=64.0, margin=0.4, h=0.333, t_alpha=0.01, eps=CLIP_EPS,
                 **kwargs):
        self.margin, self.h = _real("margin", margin), _real("h", h)
        self.t_alpha, self.eps = _real("t_alpha", t_alpha), _real("eps", eps)
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=-self.margin, m3=2 * self.margin,
                         fallback="clip", clip_eps=self.eps, **kwargs)
        # shape (1,) as the authors' buffers (their checkpoints load unchanged), in the weight's
        # compute dtype (float32; float64 for a float64 head)
        like = dict(dtype=compute_dtype(self.weight.dtype), device=self.weight.device)
        self.register_buffer("batch_mean", torch.full((1,), 20.0, **like))
        self.register_buffer("batch_std", torch.full((1,), 100.0, **like))

    def margins(self, embeddings):
        """(g_ang, g_add) per row; updates the running buffers in training mode."""
        with torch.no_grad():
            safe_norms = _norms(embeddings).clamp(0.001, 100)
            if self.training:
                t = self.t_alpha
                # a sharded head's statistics are over every rank's rows (ShardedMarginLoss.group)
                mean, std = batch_moments(safe_norms, getattr(self, "group", None))
                self.batch_mean.mul_(1 - t).add_(t * mean.to(self.batch_mean.dtype))
                self.batch_std.mul_(1 - t).add_(t * std.to(self.batch_std.dtype))
            mean, std = self.batch_mean.to(safe_norms.dtype), self.batch_std.to(safe_norms.dtype)
            z = ((safe_norms - mean) / (std + self.eps) * self.h).clamp(-1, 1)
        return -self.margin * z, self.margin + self.margin * z

    def forward(self, embeddings, labels, *, return_stats=False, backend=None):
        g_ang, g_add = self.margins(embeddings)
        return super().forward(embeddings, labels, return_stats=return_stats, backend=backend, m2=g_ang, m3=g_add)


class AdaFaceLoss(AdaFaceMargins, CombinedMarginLoss):
    """AdaFace (mk-minchul/AdaFace head.py): norm-adaptive angular and additive margins.

    With the clipped, detached norms n_i = clamp(|x_i|, 0.001, 100) and the running buffers
    batch_mean (init 20) and batch_std (init 100), z_i = clamp((n_i - batch_mean) / (batch_std +
    eps) * h, -1, 1); the target logit is s (cos(clamp(theta + g_ang, eps, pi - eps)) - g_add) with
    g_ang = -margin z_i (m2) and g_add = margin + margin z_i (m3): fallback="clip", clip_eps=eps.
    In training mode the buffers first move to this batch's mean and (unbiased) std of n with
    weight t_alpha, as the authors' forward does; in eval mode they are used unchanged. The margins
    carry no gradient (the norms are detached, as the authors').

    Difference from the authors: their head clamps every cosine to [-1 + eps, 1 - eps] before the
    margin; the op does not (no cosine is altered). The two agree wherever every cosine of a row
    lies within 1 - eps of +-1 (tests/test_margin_heads.py compares there). margin must be below
    0.5 here (m3 = g_add reaches 2 margin, and m3 is a cosine offset in (-1, 1)).
    """


class ElasticFaceLoss(CombinedMarginLoss):
    """ElasticFace (fdbtrs/ElasticFace utils/losses.py): a margin per sample drawn from N(margin, std)
    with torch's default generator on the embeddings' device, one draw of N per step (ignored rows
    included). kind="arc": cos(theta + m_i) (margin 0.5 by default); kind="cos": cos(theta) - m_i
    (margin 0.35). plus=True (ElasticFace+): the drawn margins, sorted ascending, go to the rows in
    order of descending target cosine (the rows closest to their centre get the smallest margins),
    from an O(N D) gather of the target rows, never N x C. std = 0 is ArcFace / CosFace.

    Difference from the authors: past theta + m_i = pi their kind="arc" keeps cos(theta + m_i),
    which rises again with theta; the op applies its threshold rule there (docs/design.md eq. (3)).
    They agree wherever theta_y + m_i < pi. The authors draw for the labelled rows only: the
    generator's stream differs from theirs in batches with ignored rows.
    """

    def __init__(self, num_classes, embedding_size, *, kind="arc", scale=64.0, margin=None, std=0.0125, plus=False,
                 **kwargs):
        self.kind = _choice("kind", kind, ("arc", "cos"))
        self.margin = _real("margin", (0.5 if kind == "arc" else 0.35) if margin is None else margin)
        self.std, self.plus = _real("std", std), boolean("plus", plus)
        if self.std < 0:
            raise ValueError(f"std must be non-negative, got {self.std}")
        m2, m3 = (self.margin, 0.0) if kind == "arc" else (0.0, self.margin)
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=m2, m3=m3, **kwargs)

    def margins(self, embeddings, labels):
        """This step's per-row margins (N,), drawn from torch's default generator."""
        check_rows(embeddings, embeddings, 1)
        n, dtype = embeddings.shape[0], compute_dtype(embeddings.dtype)
        drawn = torch.normal(self.margin, self.std, size=(n,), device=embeddings.device, dtype=dtype)
        if not self.plus:
            return drawn
        with torch.no_grad():
            k, labels = self.sub_centers, check_labels(labels, n)
            safe = labels.clamp(0, self.num_classes - 1)  # ignored rows: any class (their margin is unused)
            centres = self.weight.view(self.num_classes, k, -1)[safe].to(dtype)
            target_cos = torch.einsum("nd,nkd->nk", F.normalize(embeddings.to(dtype), dim=1),
                                      F.normalize(centres, dim=2)).amax(dim=1)
            out = torch.empty_like(drawn)
            out[torch.argsort(target_cos, descending=True, stable=True)] = torch.sort(drawn).values
        return out

    def forward(self, embeddings, labels, *, return_stats=False, backend=None):
        m = self.margins(embeddings, labels)
        margin = dict(m2=m) if self.kind == "arc" else dict(m3=m)
        return super().forward(embeddings, labels, return_stats=return_stats, backend=backend, **margin)


class MagFaceLoss(CombinedMarginLoss):
    """MagFace (IrvingMeng/MagFace models/magface.py): an ArcFace margin linear in the feature norm.

    a_i = clamp(|x_i|, l_a, u_a), m_i = (u_margin - l_margin) / (u_a - l_a) (a_i - l_a) + l_margin
    (m2, per row, with its gradient: docs/design.md eq. (17a) flows through a_i into x_i), the
    authors' easy_margin (True) or threshold rule otherwise (their cos - sin(pi - m) m is eq. (3));
    loss = cross-entropy + lambda_g g(a) with g(a) = a / u_a^2 + 1 / a, reduced as the loss
    (the mean over every row for "mean", as the authors').
    """

    def __init__(self, num_classes, embedding_size, *, scale=64.0, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8,
                 lambda_g=35.0, easy_margin=True, **kwargs):
        self.l_a, self.u_a = _real("l_a", l_a), _real("u_a", u_a)
        self.l_margin, self.u_margin = _real("l_margin", l_margin), _real("u_margin", u_margin)
        self.lambda_g = _real("lambda_g", lambda_g)
        if not 0 < self.l_a < self.u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={self.l_a}, u_a={self.u_a}")
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=self.l_margin, m3=0.0,
                         easy_margin=easy_margin, **kwargs)

    def forward(self, embeddings, labels, *, return_stats=False, backend=None):
        a = _norms(embeddings).clamp(self.l_a, self.u_a)
        m = (self.u_margin - self.l_margin) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_margin
        out = super().forward(embeddings, labels, return_stats=return_stats, backend=backend, m2=m)
        loss, stats = out if return_stats else (out, None)
        g = a / self.u_a**2 + 1.0 / a
        reduction = self.options.reduction
        loss = loss + self.lambda_g * (g.mean() if reduction == "mean" else reduce_rows(g, None, reduction))
        return (loss, stats) if return_stats else loss


def running_target_mean(t, t_alpha, target_cos, active):
    """CurricularFace's update of its running t (in place, no host read): t <- t_alpha * mean +
    (1 - t_alpha) * t, the mean over the rows with a target (`active`); t is kept when no row
    has one."""
    count = active.sum()
    mean = torch.where(active, target_cos, 0.0).sum() / count.clamp_min(1)
    moved = t_alpha * mean.to(t.dtype) + (1 - t_alpha) * t
    t.copy_(torch.where(count > 0, moved, t))


class CurricularFaceT:
    """CurricularFace's settings and running t, for a head class that also derives from
    CombinedMarginLoss (CurricularFaceLoss) or distributed.ShardedMarginLoss
    (ShardedCurricularFaceLoss)."""

    def __init__(self, num_classes, embedding_size, *, scale=64.0, margin=0.5, t_alpha=0.01, **kwargs):
        self.margin, self.t_alpha = _real("margin", margin), _real("t_alpha", t_alpha)
        if not 0.0 <= self.t_alpha <= 1.0:
            raise ValueError(f"t_alpha must lie in [0, 1], got {self.t_alpha}")
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, m2=self.margin, m3=0.0,
                         nontarget="curricular", **kwargs)
        like = dict(dtype=compute_dtype(self.weight.dtype), device=self.weight.device)
        self.register_buffer("t", torch.zeros(1, **like))

    @torch.no_grad()
    def moved_t(self, target_cos, active):
        """t moved (in place) from the target cosines of the rows with a target; returns t[0]."""
        running_target_mean(self.t, self.t_alpha, target_cos, active)
        return self.t[0]


class CurricularFaceLoss(CurricularFaceT, CombinedMarginLoss):
    """CurricularFace (HuangYG123/CurricularFace head/metrics.py): an ArcFace target, and hard
    non-target cosines c_j > cos(theta_y + margin) become c_j (t + c_j) (nontarget="curricular",
    docs/design.md section 3c). The buffer t (shape (1,) as the authors', init 0) is a running
    mean of the batch's target cosines: in training mode it moves first, t <- t_alpha * mean(c_y)
    + (1 - t_alpha) * t, then the batch uses it; eval mode uses t unchanged. The target cosines
    are the op's own (negatives.head_target_cosines, O(N K D), detached); t is handed to the op as
    a 0-d view of the buffer (no host read).

    Differences from the authors: rows labelled ignore_index are left out of the mean (the
    authors' head has no ignored rows); a batch with no labelled row leaves t unchanged.
    Past theta_y = pi - margin the target logit follows the op's threshold rule, c - sin(pi - m)
    m, which is the authors' own fallback.
    """

    @torch.no_grad()
    def update_t(self, embeddings, labels):
        """The training step's move of t from this batch's target cosines (before they are used)."""
        labels = check_tensors(embeddings, self.weight, labels, self.sub_centers)
        targets = target_labels(labels, self.options.ignore_index, self.num_classes)
        x = embeddings.detach().to(operand_dtype(embeddings, self.weight))
        self.moved_t(head_target_cosines(x, self.weight.detach(), targets, self.sub_centers), targets >= 0)

    def forward(self, embeddings, labels, *, return_stats=False, backend=None):
        if self.training:
            self.update_t(embeddings, labels)
        return super().forward(embeddings, labels, return_stats=return_stats, backend=backend, nontarget_t=self.t[0])


class MVSoftmaxLoss(CombinedMarginLoss):
    """MV-Softmax (JDAI-CV/FaceX-Zoo head/MV_Softmax.py): hard non-target cosines (above the row's
    margined target cosine) become mv_weight * c + mv_weight - 1 (nontarget="mv", docs/design.md
    section 3c). kind="am": target c_y - margin (m3), hard above c_y - margin; kind="arc": target
    cos(theta_y + margin) (m2) with easy_margin=True (the authors' where(c_y > 0, cos(theta_y + m),
    c_y)), hard above cos(theta_y + margin).

    Difference from the authors: their kind="am" target keeps c_y where c_y <= margin (a jump at
    c_y = margin); here it is c_y - margin everywhere (the CosFace rule). The two agree on rows
    whose target cosine exceeds the margin.
    """

    def __init__(self, num_classes, embedding_size, *, scale=32.0, margin=0.35, mv_weight=1.12, kind="am",
                 **kwargs):
        self.kind = _choice("kind", kind, ("am", "arc"))
        self.margin, self.mv_weight = _real("margin", margin), _real("mv_weight", mv_weight)
        if self.mv_weight < 1.0:
            raise ValueError(f"mv_weight must be >= 1 (hard negatives become t c + t - 1), got {self.mv_weight}")
        margins = dict(m2=0.0, m3=self.margin) if self.kind == "am" else dict(m2=self.margin, m3=0.0, easy_margin=True)
        super().__init__(num_classes, embedding_size, scale=scale, m1=1.0, nontarget="mv", nontarget_t=self.mv_weight,
                         **margins, **kwargs)
