"""Image grids and the loss-curve plot, written as PNG files."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bdvae.files import atomic_path
from bdvae.likelihoods import to_float

GAP = 2  # pixels of black between tiles
PICTURE_COUNT = 64  # images in each of a run's three pictures (an 8 x 8 grid)


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


def side_by_side_rows(images: Tensor, reconstruct: Callable[[Tensor], Tensor], ncol: int) -> Tensor:
    """Rows that alternate: `ncol` of the uint8 `images` (N, C, H, W), then their reconstructions by
    `reconstruct` (floats in [0, 1] to floats in [0, 1]), and so on; the last pair of rows padded
    with blank tiles. For save_grid(..., ncol=ncol)."""
    rows = []
    for start in range(0, len(images), ncol):
        chunk = to_float(images[start: start + ncol])
        blank = torch.zeros(ncol - len(chunk), *chunk.shape[1:])
        rows += [torch.cat([chunk, blank]), torch.cat([reconstruct(chunk), blank])]
    return torch.cat(rows)


def save_run_pictures(model: torch.nn.Module, originals: Tensor, originals_path: Path, reconstructions_path: Path,
                      samples_path: Path, seed: int) -> None:
    """The three pictures of every run: the test images `originals` (B, C, H, W) in [0, 1]; the
    decoder's mean at the posterior mean mu of each, at the same grid position; and the decoder's
    means of PICTURE_COUNT draws z ~ N(0, I) (seeded by `seed`)."""
    model.eval()
    with torch.inference_mode():
        mu, _ = model.encode(originals)
        reconstructions = model.decode_mean(mu)
        z = torch.randn(PICTURE_COUNT, mu.shape[1], generator=torch.Generator().manual_seed(seed))
        samples = model.decode_mean(z)
    save_grid(originals, originals_path)
    save_grid(reconstructions, reconstructions_path)
    save_grid(samples, samples_path)


def tile_centres(count: int, size: int, scale: int = 1) -> list[float]:
    """Pixel coordinates of the centres of `count` tiles of `size` pixels along one axis of a grid
    (GAP between and around them), each pixel drawn as scale x scale."""
    return [scale * (GAP + i * (size + GAP) + size / 2) - 0.5 for i in range(count)]


# Margins (pixels) of a labelled grid: left for the row labels and the axis name, bottom for the
# column labels and the axis name, top for the title.
LABEL_MARGINS = {"left": 100, "right": 16, "top": 30, "bottom": 52}


def labelled_grid(images: Tensor, ncol: int, scale: int, row_labels: list[str], column_labels: list[str],
                  xlabel: str, ylabel: str, title: str):
    """A figure of the grid of `images` drawn pixel for pixel (save_grid's picture, unscaled by
    matplotlib) with a label per row and per column, names of both axes and a title in margins
    of LABEL_MARGINS pixels; save it with save_figure (its dpi, 100)."""
    plt = pyplot()
    array = grid(images, ncol)
    array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = array.shape[:2]
    m, dpi = LABEL_MARGINS, 100
    width, height = w + m["left"] + m["right"], h + m["top"] + m["bottom"]
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((m["left"] / width, m["bottom"] / height, w / width, h / height))
    ax.imshow(array, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    _, _, tile_h, tile_w = images.shape
    ax.set_xticks(tile_centres(len(column_labels), tile_w, scale), column_labels, fontsize=8)
    ax.set_yticks(tile_centres(len(row_labels), tile_h, scale), row_labels, fontsize=8)
    ax.tick_params(length=2, pad=2)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def _value(v: float) -> str:
    """A z value as a tick label: "−3", "0", "1.2" (the minus sign U+2212)."""
    return f"{v:g}".replace("-", "\u2212") if round(v, 6) != 0 else "0"


INTERPOLATION_STEPS = 10
TRAVERSAL_STEPS, TRAVERSAL_RANGE = 11, 3.0  # each dimension from -3 to 3 in 11 steps


@torch.inference_mode()
def save_interpolation(model: torch.nn.Module, x: Tensor, mu: Tensor, path: Path) -> None:
    """8 pairs of images x (the first 16, (N, C, H, W) in [0, 1]), each row an image, the decoded
    straight line between their posterior means mu (N, D) in 10 steps, and the other image;
    labelled: which test images a row joins, how far along the line a column is."""
    steps = torch.linspace(0, 1, INTERPOLATION_STEPS)
    a, b = mu[0:16:2, None], mu[1:16:2, None]  # (8, 1, D)
    line = (a + steps[None, :, None] * (b - a)).reshape(-1, mu.shape[1])  # (80, D), row by row
    rows = model.decode_mean(line).reshape(8, INTERPOLATION_STEPS, *x.shape[1:])
    images = torch.cat([x[0:16:2, None], rows, x[1:16:2, None]], 1).reshape(-1, *x.shape[1:])
    fig = labelled_grid(images, INTERPOLATION_STEPS + 2, 2,
                        row_labels=[f"{i} → {i + 1}" for i in range(0, 16, 2)],
                        column_labels=["a", *(f"{t:.2g}" for t in steps.tolist()), "b"],
                        xlabel="test image a, the decoded (1 − t) μ(a) + t μ(b) for t from 0 to 1, test image b",
                        ylabel="test images a → b", title="interpolation between posterior means")
    save_figure(fig, path)


@torch.inference_mode()
def save_traversal(model: torch.nn.Module, mu: Tensor, path: Path) -> None:
    """Each latent dimension swept over [-3, 3] in 11 steps, a row each, the others at mu (D,);
    labelled: the dimension of a row, the value of z of a column."""
    d = mu.shape[0]
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, TRAVERSAL_STEPS)
    z = mu.repeat(d, TRAVERSAL_STEPS, 1)  # (D, 11, D)
    z[torch.arange(d), :, torch.arange(d)] = values
    fig = labelled_grid(model.decode_mean(z.reshape(-1, d)), TRAVERSAL_STEPS, 2,
                        row_labels=[f"z{j}" for j in range(d)], column_labels=[_value(v) for v in values.tolist()],
                        xlabel="value of z_j (the other dimensions at the posterior mean of test image 0)",
                        ylabel="latent dimension j", title="latent traversal")
    save_figure(fig, path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def save_latent_histograms(z: Tensor, path: Path, bins: int = 60) -> None:
    """One panel per latent dimension: the histogram of encoder samples z ~ q(z|x) over the test set
    (that is, of the aggregate posterior's marginal) over the N(0, 1) density it should match."""
    plt = pyplot()
    z = z.detach().double().cpu().numpy()
    d = z.shape[1]
    ncol = min(d, 8)
    nrow = math.ceil(d / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.9 * ncol, 1.6 * nrow), squeeze=False, constrained_layout=True)
    grid_z = np.linspace(-4, 4, 200)
    density = np.exp(-0.5 * grid_z**2) / math.sqrt(2 * math.pi)
    for j, ax in enumerate(axes.flat):
        if j >= d:
            ax.axis("off")
            continue
        ax.hist(z[:, j], bins=bins, range=(-4, 4), density=True, color="tab:blue", alpha=0.6)
        ax.plot(grid_z, density, color="black", linewidth=1)
        ax.set_title(f"z{j}", fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    save_figure(fig, path)


def save_latent_scatter(mu: Tensor, labels: Tensor, path: Path, max_points: int = 5000) -> None:
    """The test set's posterior means in 2-D, coloured by digit: the latent itself when it is 2-D,
    else its first two principal components."""
    plt = pyplot()
    mu = mu.detach().double().cpu()[:max_points]
    labels = labels.cpu()[:max_points].numpy()
    if mu.shape[1] == 2:
        xy, axis_names = mu.numpy(), ("z0", "z1")
    else:
        centred = mu - mu.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ v[:2].T).numpy()
        share = (s[:2].square() / s.square().sum()).tolist()
        axis_names = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})")
    fig, ax = plt.subplots(figsize=(5.5, 5), constrained_layout=True)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3, vmin=-0.5, vmax=9.5)
    if (labels >= 0).any():
        fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title("test posterior means")
    save_figure(fig, path)


def save_loss_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Train and test curves of the loss and its two terms against the epoch."""
    plt = pyplot()

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
    save_figure(fig, path)
