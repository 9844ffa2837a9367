"""An independent float64 statement of the loss (docs/design.md sections 2-3), for tests.

It shares no code with the package: plain float64 torch arithmetic, vectorized for gradients
(`oracle`, autograd gives dX and dW) and one cosine at a time in Python floats (`loss_by_rows`).
"""

import math

import torch

EPS = 1e-12  # F.normalize's eps on the norm


def phi_scalar(c, m1, m2, m3):
    """phi of one cosine, in Python floats, with the contract's rules past pi."""
    theta = math.acos(max(-1.0, min(1.0, c)))
    angle = m1 * theta + m2
    if angle <= math.pi:
        return math.cos(angle) - m3
    if m1 == 1.0:
        return c - m3 - m2 * math.sin(m2)
    k = math.floor(angle / math.pi)
    return (-1) ** k * math.cos(angle) - 2 * k - m3


def loss_by_rows(x, w, y, s, m1, m2, m3, k=1, eps=0.0):
    """Per-row losses, every cosine and exponential in Python floats (labels all valid)."""
    n_classes = w.shape[0] // k
    losses = []
    for i in range(x.shape[0]):
        xi = x[i].tolist()
        nx = max(math.sqrt(sum(v * v for v in xi)), EPS)
        cos = []
        for j in range(n_classes):
            best = -2.0
            for r in range(j * k, j * k + k):
                wr = w[r].tolist()
                nw = max(math.sqrt(sum(v * v for v in wr)), EPS)
                best = max(best, sum(a * b for a, b in zip(xi, wr)) / (nx * nw))
            cos.append(best)
        z = [s * c for c in cos]
        yi = int(y[i])
        z[yi] = s * phi_scalar(cos[yi], m1, m2, m3)
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        losses.append(lse - (1 - eps) * z[yi] - eps / n_classes * sum(z))
    return torch.tensor(losses, dtype=torch.float64)


def _phi(c, m1, m2, m3):
    theta = torch.acos(c)
    angle = m1 * theta + m2
    k = torch.floor(angle / math.pi)
    past = c - m3 - m2 * torch.sin(m2) if m1 == 1.0 else (-1.0) ** k * torch.cos(angle) - 2 * k - m3
    return torch.where(angle <= math.pi, torch.cos(angle) - m3, past)


def _normalize(v):
    """v / max(|v|, EPS) per row, dividing by the largest entry first so that no square overflows."""
    peak = v.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    u = v / peak
    return u / u.norm(dim=1, keepdim=True).clamp_min(EPS / peak)


def _hard_negative_logits(cos, cos_y, onehot, nontarget, t, margins):
    """Non-target cosines above the row's threshold remapped (no gradient through the mask):
    CurricularFace c (t + c) and MV-Softmax t c + t - 1 above cos(m1 theta_y + m2) - m3 (no rule
    past pi), the filtering 0 above the threshold t."""
    if nontarget == "filter":
        threshold = torch.full_like(cos_y, float(t))
    else:
        m1, m2, m3 = margins
        threshold = torch.cos(m1 * torch.acos(cos_y.detach().clamp(-1, 1)) + m2) - m3
    hard = (cos.detach() > threshold[:, None]) & ~onehot
    t = torch.as_tensor(t, dtype=torch.float64)
    mapped = {"curricular": cos * (t + cos), "mv": t * cos + t - 1, "filter": torch.zeros_like(cos)}[nontarget]
    return torch.where(hard, mapped, cos)


def oracle(x, w, y, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0, k=1, eps=0.0, ignore_index=-100, reduction="mean",
           row_weights=None, nontarget="none", nontarget_t=0.0):
    """Loss and (dX, dW) in float64 for raw x (N, D), w (C*K, D); labels with ignore_index.

    Margins are floats or (N,) tensors. A target cosine of exactly +-1 (parallel vectors) has
    d cos / d x = 0, so its margin term is held constant there (acos' derivative is infinite).
    row_weights: the upstream gradient of reduction="none" (default ones). nontarget,
    nontarget_t: the hard-negative map (CurricularFace, MV-Softmax, filtering).
    """
    x = x.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    xn, wn = _normalize(x), _normalize(w)
    cos = (xn @ wn.T).view(x.shape[0], w.shape[0] // k, k).amax(dim=2)
    n, c = cos.shape
    active = y != ignore_index
    target = torch.where(active, y, 0).long()
    cos_y = cos.gather(1, target[:, None])[:, 0]
    margins = [torch.as_tensor(m, dtype=torch.float64).expand(n) for m in (m1, m2, m3)]
    m1_rows = margins[0]
    inside = cos_y.abs() < 1
    safe = torch.where(inside, cos_y, cos_y.detach().clamp(-1 + 1e-9, 1 - 1e-9))
    phis = torch.stack([_phi(safe[i], float(m1_rows[i]), margins[1][i], margins[2][i]) for i in range(n)]) \
        if n else cos_y
    phis = torch.where(inside, phis, phis.detach())
    onehot = torch.nn.functional.one_hot(target, c).bool() & active[:, None]
    others = cos
    if nontarget != "none":
        others = _hard_negative_logits(cos, cos_y, onehot, nontarget, nontarget_t,
                                       [m for m in margins])
    z = scale * torch.where(onehot, phis[:, None], others)
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, target[:, None])[:, 0]
    rows = torch.where(active, lse - (1 - eps) * z_y - eps / c * z.sum(1), 0.0)
    if reduction == "none":
        weights = torch.ones(n, dtype=torch.float64) if row_weights is None else row_weights.double()
        (rows * weights).sum().backward()
        return rows.detach(), x.grad, w.grad
    loss = rows.sum() if reduction == "sum" else rows.sum() / active.sum().clamp_min(1)
    loss.backward()
    return loss.detach(), x.grad, w.grad
