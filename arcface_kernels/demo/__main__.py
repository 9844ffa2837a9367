"""`python -m arcface_kernels.demo`: six heads, one table, one figure."""

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from ..backends import resolve_backend
from .data import load_digit_splits
from .metrics import pair_scores, roc_auc, tar_at_far
from .plot import plot_embeddings
from .train import HEADS, embed, train_head


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m arcface_kernels.demo", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--embedding-dim", type=int, default=2)
    # s = 16: with a handful of classes a larger scale saturates the softmax before the margin matters.
    p.add_argument("--scale", type=float, default=16.0)
    p.add_argument("--unseen", default="8,9", help="digits held out of training (comma-separated)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one epoch, a fifth of every split (smoke test)")
    return p.parse_args(argv)


def evaluate(trained, splits, device):
    test_emb = embed(trained.embedder, splits.test_x, device)
    classes, _ = trained.head.predict(test_emb.to(device))
    accuracy = float((classes[:, 0].cpu() == splits.test_y).double().mean())
    unseen_emb = embed(trained.embedder, splits.unseen_x, device)
    scores, genuine = pair_scores(unseen_emb, splits.unseen_y)
    return dict(accuracy=accuracy, auc=roc_auc(scores, genuine), tar=tar_at_far(scores, genuine, 1e-2),
                test_emb=test_emb, unseen_emb=unseen_emb, centres=trained.head.weight.detach().float().cpu())


def format_table(rows):
    lines = ["| head | final train loss | closed-set accuracy | open-set ROC AUC | open-set TAR @ FAR=1e-2 |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['loss']:.3f} | {r['accuracy']:.3f} | {r['auc']:.3f} | {r['tar']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    backend = resolve_backend("auto", device)
    unseen = tuple(int(d) for d in args.unseen.split(","))
    splits = load_digit_splits(unseen, seed=args.seed)
    epochs = args.epochs
    if args.quick:  # a fifth of every split (the images are in the data set's order: every digit in each)
        for split in ("train", "test", "unseen"):
            x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
            setattr(splits, f"{split}_x", x[: len(y) // 5])
            setattr(splits, f"{split}_y", y[: len(y) // 5])
        epochs = 1
    print(f"device {device}, backend {backend!r}; training on digits {splits.seen_digits} "
          f"({len(splits.train_y)} images), digits {list(unseen)} held out for verification")
    os.makedirs(args.out, exist_ok=True)
    rows, panels = [], []
    start = time.perf_counter()
    for spec in HEADS:
        bar = tqdm(total=epochs, desc=f"{spec.name:<14}", leave=True, file=sys.stdout)

        def progress(loss, bar=bar):
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()

        trained = train_head(spec, splits, dim=args.embedding_dim, scale=args.scale, epochs=epochs,
                             batch_size=64, lr=3e-3, seed=args.seed, device=device, backend=backend,
                             progress=progress)
        bar.close()
        result = evaluate(trained, splits, device)
        result["loss"] = trained.final_loss
        rows.append((spec.name, result))
        panels.append((spec.name, result["test_emb"], splits.test_y, result["centres"], result["unseen_emb"]))
    table = format_table(rows)
    print(f"\n{table}\n")
    table_path = os.path.join(args.out, "table.md")
    with open(table_path, "w") as f:
        f.write(table + "\n")
    figure_path = os.path.join(args.out, "embeddings.png")
    plot_embeddings(panels, figure_path)
    paths = [table_path, figure_path]
    if args.embedding_dim == 3:
        sphere_path = os.path.join(args.out, "embeddings_sphere.png")
        plot_embeddings(panels, sphere_path, sphere=True)
        paths.append(sphere_path)
    print(f"wrote {', '.join(paths)} in {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
