"""The pictures: the traversal and interpolation grids say what their rows and columns are."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bdvae import pictures


class _Decoder:
    """decode_mean of a stand-in model: 8x8 images whose brightness follows z's first two dimensions."""

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z[:, 0, None, None, None] + 0.5 * z[:, 1, None, None, None]).expand(-1, 1, 8, 8)


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


def _in_margins(path, grid: np.ndarray) -> np.ndarray:
    """The picture at `path` (grayscale), checked to hold `grid` pixel for pixel inside LABEL_MARGINS;
    returns its margins' pixels (the grid blanked out)."""
    m = pictures.LABEL_MARGINS
    with Image.open(path) as im:
        page = np.asarray(im.convert("L"), dtype=np.int64)
    h, w = grid.shape
    assert page.shape == (h + m["top"] + m["bottom"], w + m["left"] + m["right"])
    inner = page[m["top"]: m["top"] + h, m["left"]: m["left"] + w]
    assert np.abs(inner - grid).max() <= 1  # the grid itself, unscaled, unshifted (colour-map rounding aside)
    margins = page.copy()
    margins[m["top"]: m["top"] + h, m["left"]: m["left"] + w] = 255
    return margins


def test_the_traversal_labels_each_latent_dimension_and_value_of_z(tmp_path):
    mu = torch.tensor([0.5, -0.2, 0.1])
    pictures.save_traversal(_Decoder(), mu, tmp_path / "traversal.png")
    z = mu.repeat(3, 11, 1)  # (D, 11, D): row j sweeps dimension j
    z[torch.arange(3), :, torch.arange(3)] = torch.linspace(-3, 3, 11)
    grid = pictures.grid(_Decoder().decode_mean(z.reshape(-1, 3)), 11).repeat(2, 0).repeat(2, 1)
    margins = _in_margins(tmp_path / "traversal.png", grid)
    m = pictures.LABEL_MARGINS
    assert (margins[:, : m["left"]] < 128).sum() > 100  # the row labels and the axis name are drawn
    assert (margins[-m["bottom"]:] < 128).sum() > 100  # the values of z under the columns

    fig = pictures.labelled_grid(torch.zeros(6, 1, 8, 8), 3, 2, ["z0", "z1"], ["\u22123", "0", "3"],
                                 "value of z_j", "latent dimension j", "latent traversal")
    ax = fig.axes[0]
    assert _labels(ax.get_yticklabels()) == ["z0", "z1"] and _labels(ax.get_xticklabels()) == ["\u22123", "0", "3"]
    assert ax.get_xlabel() == "value of z_j" and ax.get_ylabel() == "latent dimension j"
    assert ax.get_xticks().tolist() == pictures.tile_centres(3, 8, 2)  # each label under its own column


def test_the_traversal_values_run_from_minus_three_to_three(tmp_path, monkeypatch):
    seen = {}
    real = pictures.labelled_grid

    def spy(images, ncol, scale, row_labels, column_labels, xlabel, ylabel, title):
        seen.update(rows=row_labels, columns=column_labels, xlabel=xlabel, ylabel=ylabel)
        return real(images, ncol, scale, row_labels, column_labels, xlabel, ylabel, title)

    monkeypatch.setattr(pictures, "labelled_grid", spy)
    pictures.save_traversal(_Decoder(), torch.zeros(4), tmp_path / "t.png")
    assert seen["rows"] == ["z0", "z1", "z2", "z3"]
    assert seen["columns"] == ["\u22123", "\u22122.4", "\u22121.8", "\u22121.2", "\u22120.6", "0", "0.6", "1.2", "1.8", "2.4", "3"]
    assert seen["xlabel"].startswith("value of z_j") and seen["ylabel"] == "latent dimension j"
    pictures.save_interpolation(_Decoder(), torch.rand(16, 1, 8, 8), torch.randn(16, 2), tmp_path / "i.png")
    assert seen["rows"] == ["0 → 1", "2 → 3", "4 → 5", "6 → 7", "8 → 9", "10 → 11", "12 → 13", "14 → 15"]
    assert seen["columns"][0] == "a" and seen["columns"][1] == "0" and seen["columns"][-2:] == ["1", "b"]
    assert len(seen["columns"]) == 12


def test_the_interpolation_keeps_its_grid_and_labels_it(tmp_path):
    x, mu = torch.rand(16, 1, 8, 8), torch.randn(16, 2)
    pictures.save_interpolation(_Decoder(), x, mu, tmp_path / "interpolation.png")
    t = torch.linspace(0, 1, 10)[None, :, None]
    line = (mu[0:16:2, None] + t * (mu[1:16:2, None] - mu[0:16:2, None])).reshape(-1, 2)
    rows = _Decoder().decode_mean(line).reshape(8, 10, 1, 8, 8)
    images = torch.cat([x[0:16:2, None], rows, x[1:16:2, None]], 1).reshape(-1, 1, 8, 8)
    grid = pictures.grid(images, 12).repeat(2, 0).repeat(2, 1)
    margins = _in_margins(tmp_path / "interpolation.png", grid)
    assert (margins < 128).sum() > 200  # labels drawn in the margins
