"""Float64 transcriptions of the margin heads people train with today, as their authors wrote them
(issue 18), for tests: materializing (N x C logits), plain torch, sharing no code with the package.

Written from reading each authors' head (our own code, same formulas and conventions):
- AdaFace: mk-minchul/AdaFace head.py (norm-adaptive angular and additive margins, running
  batch_mean / batch_std of the clipped feature norms, cosines clamped to [-1 + eps, 1 - eps],
  the target angle clipped into [eps, pi - eps]);
- MagFace: IrvingMeng/MagFace models/magface.py (ArcFace margin linear in a = clamp(|x|, l_a, u_a),
  easy_margin or the threshold/mm fallback, regularizer g(a) = a / u_a^2 + 1 / a);
- CurricularFace: HuangYG123/CurricularFace head/metrics.py (running t of the target cosines,
  updated before use; hard non-targets c > cos(theta_y + m) become c (t + c));
- MV-Softmax: JDAI-CV/FaceX-Zoo head/MV_Softmax.py (hard non-targets become t c + t - 1);
- ElasticFace: fdbtrs/ElasticFace utils/losses.py (per-sample margins ~ N(m, std); "plus" gives
  the smallest margins to the rows closest to their centre);
- insightface's CombinedMarginLoss inter-class filtering (non-target cosines above the threshold
  set to 0, the mask without gradient).

Differences of layout only: every weight here is (C, D) (the authors' kernels are (D, C)), every
head takes raw embeddings (AdaFace's and MagFace's backbones hand over x / |x| and |x|), and the
loss is the mean cross-entropy over rows (their training scripts). Each function returns the loss
as a float64 scalar built with autograd on x and W (call .backward() for the gradients) and
updates the given state as the authors' forward does.
"""

import math

import torch
import torch.nn.functional as F


def _unit(v):
    return v / v.norm(dim=1, keepdim=True)


def _cosines(x, w):
    return (_unit(x) @ _unit(w).T).clamp(-1.0, 1.0)


def _onehot(labels, num_classes):
    return F.one_hot(labels, num_classes).bool()


class AdaFaceState:
    def __init__(self):
        self.batch_mean = torch.tensor(20.0, dtype=torch.float64)
        self.batch_std = torch.tensor(100.0, dtype=torch.float64)


def adaface(x, w, labels, state, *, scale=64.0, margin=0.4, h=0.333, t_alpha=0.01, eps=1e-3, training=True):
    cos = _cosines(x, w).clamp(-1 + eps, 1 - eps)
    safe_norms = x.norm(dim=1).clamp(0.001, 100).detach()
    if training:
        state.batch_mean = safe_norms.mean() * t_alpha + (1 - t_alpha) * state.batch_mean
        state.batch_std = safe_norms.std() * t_alpha + (1 - t_alpha) * state.batch_std
    z = ((safe_norms - state.batch_mean) / (state.batch_std + eps) * h).clamp(-1, 1)
    hot = _onehot(labels, w.shape[0])
    g_angular = (-margin * z)[:, None]
    theta = torch.clamp(cos.acos() + torch.where(hot, g_angular, 0.0), eps, math.pi - eps)
    g_additive = (margin + margin * z)[:, None]
    logits = scale * (theta.cos() - torch.where(hot, g_additive, 0.0))
    return F.cross_entropy(logits, labels)


def magface(x, w, labels, *, scale=64.0, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8, lambda_g=35.0,
            easy_margin=True):
    a = x.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    m = (u_margin - l_margin) / (u_a - l_a) * (a - l_a) + l_margin
    cos = _cosines(x, w)
    sin = torch.sqrt(1.0 - cos**2)
    cos_m = cos * torch.cos(m) - sin * torch.sin(m)
    if easy_margin:
        cos_m = torch.where(cos > 0, cos_m, cos)
    else:
        cos_m = torch.where(cos > torch.cos(math.pi - m), cos_m, cos - torch.sin(math.pi - m) * m)
    logits = scale * torch.where(_onehot(labels, w.shape[0]), cos_m, cos)
    regularizer = (a / u_a**2 + 1.0 / a).mean()
    return F.cross_entropy(logits, labels) + lambda_g * regularizer


class CurricularFaceState:
    def __init__(self):
        self.t = torch.tensor(0.0, dtype=torch.float64)


def curricularface(x, w, labels, state, *, scale=64.0, margin=0.5, t_alpha=0.01):
    cos = _cosines(x, w)
    target = cos.gather(1, labels[:, None])
    sin = torch.sqrt(1.0 - target**2)
    target_m = target * math.cos(margin) - sin * math.sin(margin)
    hard = cos > target_m
    final_target = torch.where(target > math.cos(math.pi - margin), target_m,
                               target - math.sin(math.pi - margin) * margin)
    state.t = target.detach().mean() * t_alpha + (1 - t_alpha) * state.t
    cos = torch.where(hard, cos * (state.t + cos), cos)
    logits = scale * torch.where(_onehot(labels, w.shape[0]), final_target, cos)
    return F.cross_entropy(logits, labels)


def mv_softmax(x, w, labels, *, scale=32.0, margin=0.35, mv_weight=1.12, kind="am"):
    # FaceX-Zoo's head normalizes only the weight: its x comes normalized from the backbone.
    cos = _cosines(x, w)
    target = cos.gather(1, labels[:, None])
    if kind == "am":
        hard = cos > target - margin
        final_target = torch.where(target > margin, target - margin, target)
    else:
        sin = torch.sqrt(1.0 - target**2)
        target_m = target * math.cos(margin) - sin * math.sin(margin)
        hard = cos > target_m
        final_target = torch.where(target > 0.0, target_m, target)
    cos = torch.where(hard, mv_weight * cos + mv_weight - 1.0, cos)
    logits = scale * torch.where(_onehot(labels, w.shape[0]), final_target, cos)
    return F.cross_entropy(logits, labels)


def elastic_margins(target_cos, margins, plus):
    """The per-row margins ElasticFace uses: the drawn ones, or with plus the drawn ones sorted
    ascending and given to the rows in order of descending target cosine."""
    if not plus:
        return margins
    order = torch.argsort(target_cos.detach(), descending=True)
    out = torch.empty_like(margins)
    out[order] = torch.sort(margins).values
    return out


def elasticface(x, w, labels, margins, *, kind="arc", scale=64.0, plus=False):
    """ElasticFace with the per-row margins given (drawn by the caller, as the head does)."""
    cos = _cosines(x, w)
    hot = _onehot(labels, w.shape[0])
    m = elastic_margins(cos.gather(1, labels[:, None])[:, 0], margins, plus)[:, None]
    if kind == "arc":
        logits = scale * torch.where(hot, torch.cos(cos.acos() + m), cos)
    else:
        logits = scale * torch.where(hot, cos - m, cos)
    return F.cross_entropy(logits, labels)


def combined_margin_filtered(x, w, labels, *, scale=64.0, m2=0.5, m3=0.0, threshold=0.0):
    """insightface's CombinedMarginLoss (m1 = 1) after its inter-class filtering: non-target
    cosines above the threshold set to 0 (the mask without gradient), then the ArcFace branch
    (m3 = 0: the target's angle moved by m2 inside no_grad, so its gradient is that of the plain
    cosine) or the CosFace branch (m3 > 0: target - m3)."""
    cos = _cosines(x, w)
    hot = _onehot(labels, w.shape[0])
    if threshold > 0:
        keep = ~((cos.detach() > threshold) & ~hot)
        cos = cos * keep
    if m3 == 0.0:
        target = cos + (torch.cos(cos.detach().acos() + m2) - cos.detach())
    else:
        target = cos - m3
    logits = scale * torch.where(hot, target, cos)
    return F.cross_entropy(logits, labels)
