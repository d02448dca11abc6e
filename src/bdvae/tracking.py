"""What training reports as it goes, beside metrics.jsonl: callbacks, and a TensorBoard writer.

A callback is any object with some of the methods of `Callback`; training calls them on the
process that writes the run directory (rank 0), with the figures as a dict of floats:

- on_step(step, figures) every `train.log_every` optimizer steps: that step's loss, recon_nll
  and reg (means over its batch), its lr, beta and gradient norm;
- on_checkpoint(step) just before a training state is saved: anything buffered belongs on disk
  now, since a resumed run starts again from that state;
- on_epoch_end(epoch, figures, view) with the epoch's row of metrics.jsonl, and `view` to look
  at the model (an EpochView);
- on_train_end(run_dir, rows) once the run's files are written, with every row.

`train.tensorboard = true` adds `TensorBoard`, which writes event files under RUN/tensorboard/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bdvae.errors import BdvaeError
from bdvae.likelihoods import to_float
from bdvae.pictures import PICTURE_COUNT, grid, side_by_side_rows

HISTOGRAM_IMAGES = 1000  # test images whose posterior mu and logvar each epoch's histograms show


@dataclass(frozen=True)
class EpochView:
    """What a callback may look at when an epoch ends: the model (in training mode: use
    `posterior` and `decode`, which switch it to evaluation mode and back), the test images
    (uint8, (N, C, H, W)), the run's config, the optimizer steps so far and the run directory."""

    model: torch.nn.Module
    test_images: Tensor
    config: Any
    step: int
    run_dir: Path

    @torch.inference_mode()
    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each (B, D), of images (B, C, H, W), uint8 or floats in [0, 1], on the CPU."""
        with _eval_mode(self.model):
            device = next(self.model.parameters()).device
            mu, logvar = self.model.encode(to_float(images).to(device))
        return mu.float().cpu(), logvar.float().cpu()

    @torch.inference_mode()
    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean images (B, C, H, W) in [0, 1] for latents z (B, D), on the CPU."""
        with _eval_mode(self.model):
            device = next(self.model.parameters()).device
            return self.model.decode_mean(z.to(device)).float().cpu()


class _eval_mode:
    """The model in evaluation mode inside the block (BatchNorm uses its running statistics and
    updates none), in training mode after it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train()


class Callback:
    """The methods training calls (module docstring); each does nothing here: override the ones
    you need, or pass any object that has them."""

    def on_step(self, step: int, figures: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, figures: dict[str, float], view: EpochView) -> None:
        pass

    def on_train_end(self, run_dir: Path, rows: list[dict[str, float]]) -> None:
        pass


def call(callbacks: list[Any], method: str, *args: Any) -> None:
    """Call `method` on every callback that has it."""
    for callback in callbacks:
        if hasattr(callback, method):
            getattr(callback, method)(*args)


def summary_writer() -> type:
    """torch's TensorBoard SummaryWriter; one line if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BdvaeError("train.tensorboard = true needs the tensorboard package: "
                         "pip install 'bdvae[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


class TensorBoard(Callback):
    """Event files in `log_dir`, for `tensorboard --logdir RUN/tensorboard`: every figure of
    on_step under step/, every column of metrics.jsonl under epoch/ (x: the optimizer step), and
    each epoch a grid of samples (z ~ N(0, I), the same draws every epoch), a grid of test images
    above their reconstructions, and histograms of the test posteriors' mu and logvar.

    `resumed_after`: the step of the training state a resumed run starts from (0: from the
    beginning, stopped before its first state). Whatever the stopped run logged after it is
    purged (TensorBoard's purge_step), so the curves continue without duplicate points."""

    def __init__(self, log_dir: Path, resumed_after: int | None = None) -> None:
        self.writer = summary_writer()(str(log_dir), purge_step=None if resumed_after is None else resumed_after + 1)

    def on_step(self, step: int, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def on_checkpoint(self, step: int) -> None:
        self.writer.flush()

    def on_epoch_end(self, epoch: int, figures: dict[str, float], view: EpochView) -> None:
        for name, value in figures.items():
            if name != "epoch":
                self.writer.add_scalar(f"epoch/{name}", value, view.step)
        z = torch.randn(PICTURE_COUNT, view.config.model.latent_dim, generator=torch.Generator().manual_seed(view.config.train.seed))
        self.writer.add_image("samples", grid(view.decode(z), 8), view.step, dataformats=_format(view.test_images))
        pairs = side_by_side_rows(view.test_images[:32], lambda x: view.decode(view.posterior(x)[0]), 8)
        self.writer.add_image("reconstructions", grid(pairs, 8), view.step, dataformats=_format(view.test_images))
        mu, logvar = view.posterior(view.test_images[:HISTOGRAM_IMAGES])
        self.writer.add_histogram("posterior/mu", mu, view.step)
        self.writer.add_histogram("posterior/logvar", logvar, view.step)
        self.writer.flush()

    def on_train_end(self, run_dir: Path, rows: list[dict[str, float]]) -> None:
        self.writer.close()


def _format(images: Tensor) -> str:
    """The layout of pictures.grid's array for images (N, C, H, W): HW for one channel, else HWC."""
    return "HW" if images.shape[1] == 1 else "HWC"
