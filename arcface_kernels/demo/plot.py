"""The figure: test embeddings on the unit circle (or sphere), one panel per head."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _project(points, dim_out):
    """Unit vectors in `dim_out` dimensions: the points themselves, or their top principal axes."""
    if points.shape[1] > dim_out:
        centred = points - points.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points = points @ v[:dim_out].T
    return torch.nn.functional.normalize(points, dim=1)


def plot_embeddings(panels, path, sphere=False):
    """panels: list of (title, seen_emb, seen_labels, centres, unseen_emb). Writes a PNG."""
    dim = 3 if sphere else 2
    cols = 3 if len(panels) > 4 else len(panels)  # six heads: two rows of three
    rows = -(-len(panels) // cols)
    fig = plt.figure(figsize=(4.2 * cols, 4.4 * rows))
    # tab10 without its grey, which would blur into the unseen digits' markers
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]

    def colours(c):
        return palette[c % len(palette)]

    for i, (title, seen, labels, centres, unseen) in enumerate(panels):
        kind = {"projection": "3d"} if sphere else {}
        ax = fig.add_subplot(rows, cols, i + 1, **kind)
        together = _project(torch.cat([seen, unseen, centres]), dim)
        seen_u, unseen_u, centres_u = together.split([len(seen), len(unseen), len(centres)])
        for c in range(len(centres)):
            pts = seen_u[labels == c]
            ax.scatter(*pts.T.tolist(), s=6, color=colours(c), alpha=0.6)
            ax.plot(*[[0.0, 1.15 * float(v)] for v in centres_u[c]], color=colours(c), lw=1.5)
        ax.scatter(*unseen_u.T.tolist(), s=6, color="black", alpha=0.25, marker="x")
        if not sphere:
            t = torch.linspace(0, 2 * math.pi, 200)
            ax.plot(torch.cos(t).tolist(), torch.sin(t).tolist(), color="grey", lw=0.5)
            ax.set_aspect("equal")
            ax.set_xlim(-1.25, 1.25)
            ax.set_ylim(-1.25, 1.25)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("test embeddings (colour: seen digit, line: class centre, x: unseen digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
