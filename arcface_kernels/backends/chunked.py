"""The `torch` backend: the fused op in plain PyTorch, walking the classes in chunks.

Runs on any device and dtype and computes in the compute dtype (float32; float64 for float64).
One (N x chunk) tile buffer is reused by every chunk, sized by the workspace budget
(common.workspace_budget) and, on a CPU, by common.CPU_TILE_BYTES: no N x C tensor ever exists.
Math: docs/design.md sections 4-5; the pass plan: docs/backends/torch.md.

The scalings are folded into the GEMM operands rather than applied to the tiles:

    xs = (s rx) * X          once per call (N x D)
    ws = rw * W_c            once per chunk (chunk x D), read by every GEMM of the chunk
    Z  = xs ws^T             = s cos, the tile (the target column patched in place)

(On a CPU with the fused epilogue, float32/float64 rows and K = 1: no ws; the GEMMs read W_c and
the epilogue applies rw per column, `_Walk.raw_w`. bfloat16 rows there, with oneMKL's bfloat16 GEMM:
no xs either; float32 accumulation of x . w_j, the epilogue applies s rx per row too, and backward
rounds G = diag(a) P diag(rw) once into bfloat16 for its two GEMMs, `_Walk.bf16`.)

Forward, per tile: the target column is read and set to -inf (O(N)), then a row max, one
exp pass and a row sum give the online log-sum-exp of the non-target logits (eq. (10)); the
margin phi is applied once per row after the loop, and the target's exp joins there, so the
non-target sum (PartialStats.nontarget_sum_exp) is kept apart at no cost. The top-1 class
needs an argmax only on the rows whose best cosine this chunk improves.

Backward, per tile: P = exp(Z - lse) straight from the GEMM (addmm with the bias -lse), the
target entry patched (O(N)), and then, with a = s g rx,

    G = diag(a) P diag(rw)    (never formed)
    B += P ws                 so that  G W_c = diag(a) P ws
    A_c = rw * (P^T Xa)       Xa = a * X, once per call
    dW_c = A_c - pw (w . A_c) w,   dX = B - px (x . B) x   with B = a * sum of P ws

(eqs. (20)-(24)): two element-wise passes over a tile in forward (max, exp; the sum reads it),
one in backward (exp), plus the GEMMs that write and read it.

With the non-target epilogue (options.negatives, negatives.py, docs/design.md section 3c) the hard
non-target logits are remapped in logit units (_Walk.hard_map): forward after the top-1 (which
reads the plain logits), before the log-sum-exp; backward from Z itself (no -lse bias) with P
times dh/dc. The plain path runs the same ops as without it.
"""

import torch

from ..dtypes import compute_dtype
from ..margins import phi
from .chunk_plan import gradient_dtype
from .common import classes_per_chunk, projection_factor, projection_scale, tile_classes
from .contract import PartialStats


def _find_cpu_ops():
    """torch.ops.arcface_kernels_cpu when the extension that registers it (arcface_kernels._cpu,
    csrc/cpu_epilogue.cpp) loads, else None: the package then runs on torch ops alone."""
    try:
        from .. import _cpu  # noqa: F401 - loading it registers the ops
    except ImportError:
        return None
    ops = torch.ops.arcface_kernels_cpu
    return ops if all(hasattr(ops, op) for op in ("forward_tile", "row_block_walk", "bf16_gemm")) else None


_CPU_OPS = _find_cpu_ops()


def bf16_gemm(dtype) -> bool:
    """Does the CPU walk run its GEMMs on operands of `dtype` as given, accumulating in float32?
    Where the gradient tile G is bfloat16 (chunk_plan.gradient_dtype: bfloat16 inputs, as on a
    GPU) and torch carries oneMKL's bfloat16 GEMM (csrc/cpu_bf16_gemm.cpp). Else the walk computes
    on float32 copies of each class chunk (float16 inputs too: a float16 G would flush small
    probabilities, and gradient_dtype keeps float32 G for them)."""
    return (gradient_dtype(dtype) == torch.bfloat16 and _CPU_OPS is not None and _CPU_OPS.has_bf16_gemm())


def fused_epilogue(device) -> bool:
    """Does the chunk loop on `device` run the fused CPU epilogue (csrc/cpu_epilogue.cpp) instead
    of torch ops? On a CPU, when the extension carries it (tests set _CPU_OPS = None to compare)."""
    return _CPU_OPS is not None and device.type == "cpu"


# forward: the rows whose best cosine a chunk improves get their argmax from a copy of those rows
# while they are at most 1 / this of the rows (the first chunks: a pass over the whole tile)
_ARGMAX_COPY_FRACTION = 8


def chunk_classes(n_rows, sub_centers, dim, dtype, device=None, mapped_in_torch=False, bf16_operands=False):
    """Classes per chunk so that everything a chunk allocates fits in the workspace budget: the
    (N x chunk * K) tile buffer and a copy of an eighth of its rows (the top-1's argmax), with
    sub-centers also the per-class max and its int64 index, and three (chunk * K x D) blocks (the
    scaled class rows, their gradient and a temporary); with mapped_in_torch (the non-target
    epilogue in torch ops, _map_hard / _map_hard_slope) two more N x chunk tiles and a bool
    mask; with bf16_operands the backward's G tile in bfloat16 (2 bytes an entry). The
    N x D operands and accumulators (xs, Xa, B) come out of the budget first. On a CPU the tile is
    also kept within common.CPU_TILE_BYTES (common.tile_classes)."""
    itemsize = torch.finfo(dtype).bits // 8
    k, n = sub_centers, max(n_rows, 1)
    per_class = (n * k * itemsize + n * itemsize // _ARGMAX_COPY_FRACTION + (n * (itemsize + 8) if k > 1 else 0)
                 + 3 * k * dim * itemsize + (n * (2 * itemsize + 1) if mapped_in_torch else 0)
                 + (2 * n if bf16_operands else 0))
    fixed = 3 * n * dim * itemsize
    budget_classes = classes_per_chunk(per_class, reserved=fixed)
    return max(1, min(budget_classes, tile_classes(n * k * itemsize, device)))


class ChunkCosines:
    """Cosines of all rows against one class chunk, max over sub-centers (predict.topk_classes)."""

    def __init__(self, x, rx, w, rw, start, stop, sub_centers):
        k = sub_centers
        self.w_rows = w[start * k : stop * k].to(x.dtype)
        self.rw_rows = rw[start * k : stop * k]
        raw = x @ self.w_rows.T
        self.raw = raw.mul_(rx[:, None]).mul_(self.rw_rows[None, :])
        if k == 1:
            self.cos, self.pick = raw, None
        else:
            self.cos, self.pick = raw.view(raw.shape[0], stop - start, k).max(dim=2)


class _Walk:
    """What every chunk of one call shares: the scaled rows, the reused buffers, the targets."""

    def __init__(self, x, w, labels, options, norms):
        self.cdt = cdt = compute_dtype(x.dtype)
        self.n, self.dim = x.shape
        self.k = options.sub_centers
        self.n_classes = w.shape[0] // self.k
        self.w, self.rw = w, norms.rw
        self.s = options.scale
        self.fused = fused_epilogue(x.device)
        self.hard_map = _hard_map(options.negatives, self.s, cdt)
        # bfloat16 operands: the GEMMs read x and W_c as given and accumulate in float32
        # (bf16_gemm); the epilogue applies s rx per row and rw per column
        self.bf16 = (self.fused and self.k == 1 and self.hard_map is None and w.dtype == x.dtype
                     and w.is_contiguous() and bf16_gemm(x.dtype))
        # else the scale and the row norms folded into the GEMM's left operand (one N x D pass)
        self.row_scale = (norms.rx * self.s).to(cdt) if self.bf16 else None
        self.xs = x if self.bf16 else torch.mul(x, (norms.rx * self.s).to(cdt)[:, None])
        self.step = chunk_classes(self.n, self.k, self.dim, cdt, x.device,
                                  mapped_in_torch=self.hard_map is not None and not self.fused,
                                  bf16_operands=self.bf16)
        width = min(self.step, max(self.n_classes, 1)) * self.k
        self.tile_buffer = torch.empty(self.n * width, dtype=cdt, device=x.device)
        # the fused epilogue on rows already in the compute dtype (or bfloat16 operands), without
        # sub-centres, reads W_c itself and applies rw per column in its sweeps: no ws copy
        # (docs/backends/torch.md)
        self.raw_w = self.bf16 or (self.fused and self.k == 1 and w.dtype == cdt and w.is_contiguous())
        self.w_buffer = None if self.raw_w else torch.empty(width * self.dim, dtype=cdt, device=x.device)
        self.width = width
        self.labels = labels
        self.rows = torch.arange(self.n, device=x.device)

    def chunks(self):
        for start in range(0, self.n_classes, self.step):
            yield start, min(start + self.step, self.n_classes)

    def scaled_rows(self, start, stop):
        """ws = rw * W_c in the compute dtype, in the reused buffer; W_c itself with raw_w."""
        rows = slice(start * self.k, stop * self.k)
        w_rows = self.w[rows]
        if self.raw_w:
            return w_rows, w_rows, rows
        out = self.w_buffer[: w_rows.numel()].view(w_rows.shape)
        return torch.mul(w_rows, self.rw[rows][:, None], out=out), w_rows, rows

    def tile(self, width):
        return self.tile_buffer[: self.n * width].view(self.n, width)

    def product(self, out, a, b, accumulate=False):
        """out = a @ b (+ out with accumulate), float32 accumulation: bf16_gemm on bfloat16 operands."""
        if self.bf16:
            _CPU_OPS.bf16_gemm(out, a, b, 1.0 if accumulate else 0.0)
        elif accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return out

    def targets(self, start, stop):
        """(inside, flat index of each row's target entry in an (N x classes) tile, 0 where outside)."""
        local = self.labels - start
        inside = (local >= 0) & (local < stop - start)
        flat = self.rows * (stop - start) + torch.where(inside, local, 0)
        return inside, flat, local


def _hard_map(negatives, s, cdt):
    """The non-target epilogue in logit units z = s c, or None on the plain path: (threshold,
    coeffs) with threshold_i = s tau_i and coeffs = (a / s, b, s e), so that s h(z / s) = z (A z +
    B) + E and dh/dc = 2 A z + B (eqs. (N1)-(N2)); the same tensors feed both walks."""
    if negatives is None:
        return None
    a, b, e = negatives.coeffs.to(cdt).unbind(0)
    return (negatives.threshold.to(cdt) * s).contiguous(), torch.stack((a / s, b, e * s))


def _map_hard(z, hard_map, hard=None):
    """Eq. (N1) in logit units on a tile whose target entries are -inf (never hard) or patched
    after, in place: z (A z + B) + E where z > threshold_i (`hard`, when the caller has it; the
    fused op's map_hard, csrc/cpu_epilogue_rows.h)."""
    threshold, coeffs = hard_map
    a, b, e = coeffs.unbind(0)
    if hard is None:
        hard = z > threshold[:, None]
    mapped = z * a
    mapped.add_(b).mul_(z).add_(e)
    torch.where(hard, mapped, z, out=z)


def _map_hard_slope(z, hard_map):
    """Eq. (N1) on a backward tile holding Z (targets included: their entry is patched after), in
    place, and eq. (N2)'s dh/dc, 2 A z + B where z > threshold_i and 1 elsewhere (a new tile)."""
    threshold, coeffs = hard_map
    a, b, _ = coeffs.unbind(0)
    hard = z > threshold[:, None]
    slope = z * (a + a)
    slope.add_(b)
    torch.where(hard, slope, slope.new_ones(()), out=slope)
    _map_hard(z, hard_map, hard)
    return slope


def forward(x, w, labels, options, norms):
    walk = _Walk(x, w, labels, options, norms)
    smoothing = options.label_smoothing != 0
    chunks = _fused_forward_chunks if walk.fused else _torch_forward_chunks
    nt_max, nt_sum, best_z, best_class, target_z, nt_logit_sum = chunks(walk, labels, smoothing)
    return finish_forward(walk.s, labels, options, nt_max, nt_sum, best_z, best_class, target_z, nt_logit_sum)


def _fused_forward_chunks(walk, labels, smoothing):
    """The chunk loop with the CPU epilogue: the GEMM, then one op folds the tile into the row
    statistics (csrc/cpu_epilogue.cpp, forward_tile: the same rules as _torch_forward_chunks)."""
    n, k = walk.n, walk.k
    nt_max = torch.full((n,), -float("inf"), dtype=walk.cdt)
    nt_sum, target_z, nt_logit_sum = (torch.zeros(n, dtype=walk.cdt) for _ in range(3))
    best_z = nt_max.clone()
    best_class = torch.zeros(n, dtype=torch.int64)
    for start, stop in walk.chunks():
        ws, _, rows = walk.scaled_rows(start, stop)
        # with raw_w: xs . w_j (with bfloat16 operands x . w_j), scaled by the op
        z = walk.product(walk.tile(ws.shape[0]), walk.xs, ws.T)
        if k > 1:
            z = z.view(n, stop - start, k).amax(dim=2)  # eq. (8), as in _torch_forward_chunks
        _CPU_OPS.forward_tile(z, labels, start, nt_max, nt_sum, best_z, best_class, target_z, nt_logit_sum,
                              smoothing, walk.rw[rows] if walk.raw_w else None, *(walk.hard_map or ()),
                              row_scale=walk.row_scale)
    return nt_max, nt_sum, best_z, best_class, target_z, nt_logit_sum


def _torch_forward_chunks(walk, labels, smoothing):
    """The chunk loop in torch ops: (non-target max, sum of exp shifted by it, best logit, its
    class, target logit, non-target logit sum or None without smoothing), per row."""
    cdt, n, k = walk.cdt, walk.n, walk.k
    device = walk.xs.device
    neg_inf = torch.tensor(-float("inf"), dtype=cdt, device=device)
    mapped = walk.hard_map is not None
    first = True
    for start, stop in walk.chunks():
        ws, _, _ = walk.scaled_rows(start, stop)
        z = torch.mm(walk.xs, ws.T, out=walk.tile(ws.shape[0]))
        if k > 1:
            z = z.view(n, stop - start, k).amax(dim=2)  # a class's cosine is its best sub-centre's (eq. (8))
        inside, flat, local = walk.targets(start, stop)
        flat_z = z.view(-1)
        z_y = flat_z[flat]
        if smoothing and not mapped:
            chunk_logit_sum = z.sum(1) - torch.where(inside, z_y, 0.0)
        flat_z[flat] = torch.where(inside, neg_inf, z_y)  # the target's term is kept apart
        chunk_max = z.amax(dim=1)
        # top-1 of the plain cosines, the lowest class on ties (earlier chunks first, then the
        # lowest index in the chunk): after the first chunk, an argmax only where a chunk holds
        # a better cosine
        plain_max = torch.where(inside, torch.maximum(chunk_max, z_y), chunk_max)
        if first:
            arg = z.argmax(dim=1)
            target_wins = inside & ((z_y > chunk_max) | ((z_y == chunk_max) & (local < arg)))
            best_class, best_z, target_z = torch.where(target_wins, local, arg), plain_max, z_y
        else:
            target_z = torch.where(inside, z_y, target_z)
            better = (plain_max > best_z).nonzero().squeeze(1)
            if better.numel():
                # a copy of at most an eighth of the tile (chunk_classes); else one pass over all of it
                few = better.numel() <= n // _ARGMAX_COPY_FRACTION
                arg = z.index_select(0, better).argmax(dim=1) if few else z.argmax(dim=1).index_select(0, better)
                at = chunk_max[better]
                t_better, y_better = z_y[better], local[better]
                target_wins = inside[better] & ((t_better > at) | ((t_better == at) & (y_better < arg)))
                best_class[better] = torch.where(target_wins, y_better, arg) + start
                best_z[better] = plain_max[better]
        if mapped:  # the non-target epilogue, after the top-1 of the plain logits
            _map_hard(z, walk.hard_map)
            chunk_max = z.amax(dim=1)
            if smoothing:  # the mapped non-target logits' sum: the target entry counted as 0
                flat_z[flat] = torch.where(inside, 0.0, flat_z[flat])
                chunk_logit_sum = z.sum(1)
                flat_z[flat] = torch.where(inside, neg_inf, flat_z[flat])
        if first:
            # online log-sum-exp of the non-target logits (eq. (10)); an all -inf row adds 0
            shift = torch.where(chunk_max == -float("inf"), 0.0, chunk_max)
            nt_max, nt_sum = chunk_max, z.sub_(shift[:, None]).exp_().sum(1)
            nt_logit_sum = chunk_logit_sum if smoothing else None
            first = False
        else:
            if smoothing:
                nt_logit_sum += chunk_logit_sum
            new_max = torch.maximum(nt_max, chunk_max)
            shift = torch.where(new_max == -float("inf"), 0.0, new_max)
            chunk_sum = z.sub_(shift[:, None]).exp_().sum(1)
            nt_sum = nt_sum.mul_(torch.exp(nt_max - shift)).add_(chunk_sum)
            nt_max = new_max
        del z, flat_z  # with sub-centres z is this chunk's own tile: freed before the next one
    if first:  # no classes
        nt_sum = torch.zeros(n, dtype=cdt, device=device)
        nt_max = torch.full_like(nt_sum, -float("inf"))
        target_z, best_z, nt_logit_sum = torch.zeros_like(nt_sum), nt_max.clone(), torch.zeros_like(nt_sum)
        best_class = torch.zeros(n, dtype=torch.int64, device=device)
    return nt_max, nt_sum, best_z, best_class, target_z, (nt_logit_sum if smoothing else None)


def finish_forward(s, labels, options, nt_max, nt_sum, best_z, best_class, target_z, nt_logit_sum):
    """The margin on the target and the final statistics, once per row (eq. (10)), from the walk's
    running row statistics (logit scale s; nt_logit_sum None without smoothing)."""
    smoothing = options.label_smoothing != 0
    if not smoothing:
        nt_logit_sum = torch.zeros_like(nt_sum)  # PartialStats.logit_sum is read only with smoothing
    has_target = labels >= 0
    target_cos = torch.where(has_target, target_z / s, 0.0)
    target_logit = torch.where(has_target, s * phi(target_cos, options.m1, options.m2, options.m3,
                                                   options.easy_margin, options.clip), 0.0)
    row_max = torch.where(has_target, torch.maximum(nt_max, target_logit), nt_max)
    shift = torch.where(row_max == -float("inf"), 0.0, row_max)
    nontarget_sum_exp = nt_sum * torch.exp(nt_max - shift)
    sum_exp = nontarget_sum_exp + torch.where(has_target, torch.exp(target_logit - shift), 0.0)
    logit_sum = nt_logit_sum + target_logit if smoothing else nt_logit_sum
    return PartialStats(row_max, sum_exp, target_logit, logit_sum, target_cos, best_z / s, best_class,
                        nontarget_sum_exp)


def backward(grad_rows, x, w, labels, lse, target_dcos, options, num_classes, norms, dw_dtype):
    walk = _Walk(x, w, labels, options, norms)
    cdt, n, k, s = walk.cdt, walk.n, walk.k, walk.s
    g = grad_rows.to(cdt)
    smooth = options.label_smoothing / num_classes
    row_factor = ((s * g) * norms.rx).to(cdt)  # a = s g rx: G = diag(a) P diag(rw)
    # Xa = a X; with bfloat16 operands G itself carries a (its rows scaled as it is rounded) and A_c reads X
    xa = x if walk.bf16 else torch.mul(x, row_factor[:, None])
    lse = lse.to(cdt).contiguous()
    # Z - lse from the GEMM (addmm); the non-target epilogue maps Z itself, lse applied after the map
    bias = None if walk.hard_map is not None else -lse[:, None]
    # the target entry of P: G_iy = target_dcos rx rw_y, i.e. P_iy = target_dcos / (s g)
    target_p = torch.where(g != 0, target_dcos.to(cdt) / torch.where(g != 0, s * g, 1.0), 0.0)
    projected = (projection_factor(norms.rw) > 0).to(cdt)  # 0 on rows clamped at eps (common.projection_factor)
    b = torch.zeros(n, walk.dim, dtype=cdt, device=x.device)
    dw = torch.empty(w.shape, dtype=dw_dtype, device=w.device)
    a_buffer = torch.empty(walk.width * walk.dim, dtype=cdt, device=x.device)
    g_buffer = torch.empty(n * walk.width, dtype=x.dtype, device=x.device) if walk.bf16 else None
    fused, raw_w = walk.fused, walk.raw_w
    for start, stop in walk.chunks():
        ws, w_rows, rows = walk.scaled_rows(start, stop)
        width = ws.shape[0]
        if raw_w:  # p = xs . w_j (x . w_j); the op makes it P diag(rw), so that the GEMMs below read W_c itself
            p = walk.product(walk.tile(width), walk.xs, ws.T)
            _CPU_OPS.backward_tile(p, labels, start, target_p, smooth, walk.rw[rows], lse, *(walk.hard_map or ()),
                                   row_scale=walk.row_scale)
        elif k == 1:
            p = _logits(walk, ws, bias)
            _probabilities(walk, p, start, stop, target_p, smooth, lse)
        else:  # route each class's gradient to its winning sub-centre (eq. (18))
            p = _logits(walk, ws, bias)
            best, pick = p.view(n, stop - start, k).max(dim=2)
            _probabilities(walk, best, start, stop, target_p, smooth, lse)
            p.zero_().view(n, stop - start, k).scatter_(2, pick[:, :, None], best[:, :, None])
            del best, pick  # freed before the next chunk's
        if walk.bf16:  # G = diag(a) P diag(rw), rounded once into bfloat16 (as a GPU's G tile)
            p = torch.mul(p, row_factor[:, None], out=g_buffer[: n * width].view(n, width))
        walk.product(b, p, ws, accumulate=True)
        a = walk.product(a_buffer[: width * walk.dim].view(width, walk.dim), p.T, xa)
        # eq. (24) with ws = rw w: pw (w . A) w = [pw > 0] (ws . A) ws, rounded once into dw_dtype
        # (with raw_w: = [pw > 0] rw^2 (w . A) w, A = P diag(rw)^T Xa)
        if fused:
            _CPU_OPS.project_chunk(a, ws, walk.rw[rows], projected[rows], dw[rows], raw_w)
            continue
        a.mul_(walk.rw[rows][:, None])
        coef = torch.linalg.vecdot(a, ws, dim=1).mul_(projected[rows])
        torch.sub(a, ws.mul_(coef[:, None]), out=dw[rows])  # ws is spent: the next chunk rewrites it
    if not walk.bf16:
        b.mul_(row_factor[:, None])
    del walk, xa, a_buffer, g_buffer
    dx = torch.empty_like(b)
    tangent_project(b, x, projection_scale(norms.rx), dx)  # eq. (23)
    return dx, dw


def _logits(walk, ws, bias):
    """The chunk's tile Z = xs ws^T, minus lse when bias = -lse is given (addmm)."""
    out = walk.tile(ws.shape[0])
    return torch.mm(walk.xs, ws.T, out=out) if bias is None else torch.addmm(bias, walk.xs, ws.T, out=out)


def _probabilities(walk, p, start, stop, target_p, smooth, lse):
    """p (N x classes, holding Z - lse; Z with the non-target epilogue) becomes P = exp(p) - eps / C
    (eq. (15)), with the epilogue (exp(map(Z) - lse) - eps / C) dh/dc, and each row's target entry
    set to target_p, in place."""
    if walk.fused:
        epilogue = () if walk.hard_map is None else (None, lse, *walk.hard_map)
        _CPU_OPS.backward_tile(p, walk.labels, start, target_p, smooth, *epilogue)
        return
    if walk.hard_map is None:
        p.exp_()
    else:
        slope = _map_hard_slope(p, walk.hard_map)
        p.sub_(lse[:, None]).exp_()
    if smooth:
        p.sub_(smooth)
    if walk.hard_map is not None:
        p.mul_(slope)
    inside, flat, _ = walk.targets(start, stop)
    flat_p = p.view(-1)
    flat_p[flat] = torch.where(inside, target_p, flat_p[flat])


def tangent_project(grad, v, v_proj, out):
    """out = grad - v_proj (v . grad) v per row, rounded once into out's dtype (inf where it
    overflows): chunk_plan.project_rows with one temporary instead of three."""
    coef = (grad * v).sum(1).mul_(v_proj)
    torch.addcmul(grad, v, coef[:, None], value=-1.0, out=out)
