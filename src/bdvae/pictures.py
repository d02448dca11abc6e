"""Image grids and the loss-curve plot, written as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import Tensor

from bdvae.checkpoint import atomic_path

GAP = 2  # pixels of black between tiles


def grid(images: Tensor, ncol: int | None = None) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one uint8 (rows*(H+GAP)+GAP, cols*(W+GAP)+GAP[, 3]) image,
    filled row by row, so image i sits at row i // ncol, column i % ncol."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    tiles = (images.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy().transpose(0, 2, 3, 1)
    out = np.zeros((nrow * (h + GAP) + GAP, ncol * (w + GAP) + GAP, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, ncol)
        out[GAP + r * (h + GAP): GAP + r * (h + GAP) + h, GAP + col * (w + GAP): GAP + col * (w + GAP) + w] = tile
    return out[..., 0] if c == 1 else out


def save_grid(images: Tensor, path: Path, ncol: int | None = None, scale: int = 1) -> None:
    """Write a grid of images as a PNG, each pixel drawn as scale x scale pixels."""
    from PIL import Image

    array = grid(images, ncol)
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_loss_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Train and test curves of the loss and its two terms against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    for ax, (key, title) in zip(axes, [("loss", "loss"), ("recon_nll", "reconstruction NLL (nats)"),
                                       ("reg", "regularizer (nats)")]):
        for split, style in (("train", "-o"), ("test", "--s")):
            ax.plot(epochs, [r[f"{split}_{key}"] for r in rows], style, label=split, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
