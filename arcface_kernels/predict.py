"""Top-k classes by cosine, walking the classes in chunks (no N x C tensor)."""

import torch

from .backends.chunked import ChunkCosines
from .backends.common import classes_per_chunk, overflow_safe_rows
from .dtypes import compute_dtype
from .validation import check_rows, integer, positive_int


def _classes_per_chunk(n_rows, sub_centers, dim, dtype):
    """Classes per chunk within the workspace budget: the cosine tile (and its max over sub-centers),
    the sorted copy with its int64 indices, and the class rows in the compute dtype."""
    itemsize = torch.finfo(dtype).bits // 8
    per_row = sub_centers * itemsize + (itemsize if sub_centers > 1 else 0) + itemsize + 8
    return classes_per_chunk(max(n_rows, 1) * per_row + sub_centers * dim * itemsize)


@torch.no_grad()
def topk_classes(embeddings, weight, k=1, sub_centers=1):
    """The k classes with the largest cosine per row: (classes int64 (N, k), cosines float32 (N, k)).

    With sub-centers a class's cosine is the max over its rows. Ties go to the lower class index.
    """
    sub_centers = positive_int("sub_centers", sub_centers)
    check_rows(embeddings, weight, sub_centers)
    n_classes = weight.shape[0] // sub_centers
    k = integer("k", k)
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must lie in [1, {n_classes}], got {k}")
    cdt = compute_dtype(embeddings.dtype)
    embeddings, rx, _ = overflow_safe_rows(embeddings, cdt)
    weight, rw, _ = overflow_safe_rows(weight, cdt)
    x = embeddings.to(cdt)
    n = embeddings.shape[0]
    best_cos = torch.empty(n, 0, dtype=cdt, device=x.device)
    best_cls = torch.empty(n, 0, dtype=torch.int64, device=x.device)
    step = max(k, _classes_per_chunk(n, sub_centers, embeddings.shape[1], cdt))
    for start in range(0, n_classes, step):
        stop = min(start + step, n_classes)
        cos = ChunkCosines(x, rx, weight, rw, start, stop, sub_centers).cos
        # A stable sort, not topk (whose order among equal values is unspecified): lower index first.
        chunk_cos, chunk_idx = torch.sort(cos, dim=1, descending=True, stable=True)
        chunk_cos, chunk_idx = chunk_cos[:, :k], chunk_idx[:, :k]
        # Earlier candidates first so that a stable sort keeps lower class indices on ties.
        merged_cos = torch.cat([best_cos, chunk_cos], dim=1)
        merged_cls = torch.cat([best_cls, chunk_idx + start], dim=1)
        order = torch.sort(merged_cos, dim=1, descending=True, stable=True).indices[:, :k]
        best_cos, best_cls = merged_cos.gather(1, order), merged_cls.gather(1, order)
    return best_cls, best_cos.float()
