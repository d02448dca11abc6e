"""Training: Adam over shuffled mini-batches drawn by indexing one in-memory uint8 tensor.

After each epoch the loss terms on the training set (running means) and on the test set go to
metrics.jsonl and loss_curve.png; at the end the weights, the config and the three pictures are
written into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bdvae import checkpoint, pictures
from bdvae.config import Config
from bdvae.data import Dataset, load_dataset
from bdvae.likelihoods import LIKELIHOODS
from bdvae.model import VAE, build_model
from bdvae.objective import beta_at, loss_terms, regularizer
from bdvae.regularizers import REGULARIZERS

METRICS_FILE = "metrics.jsonl"
PICTURE_COUNT = 64  # images in originals.png, reconstructions.png and samples.png (an 8 x 8 grid)
EVAL_BATCH = 1000
POSTFIX_EVERY = 25  # steps between progress-bar updates (each one synchronises on the loss)


def to_float(x: Tensor) -> Tensor:
    """uint8 pixels -> floats in [0, 1]."""
    return x.float().div_(255.0)


def binarized(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ~ Bernoulli(intensity): dynamic binarization (Salakhutdinov & Murray 2008)."""
    return torch.bernoulli(x, generator=generator)


@torch.inference_mode()
def evaluate_terms(model: VAE, images: Tensor, config: Config, seed: int) -> dict[str, float]:
    """Mean loss terms over `images` (uint8), with fixed noise so that epochs are comparable;
    both KL and BD of the same posteriors are reported whatever the model is trained with."""
    model.eval()
    objective = config.objective
    likelihood = LIKELIHOODS[objective.likelihood]
    gen = torch.Generator().manual_seed(seed)
    sums = {"recon_nll": 0.0, "reg": 0.0, "kl": 0.0, "bhattacharyya": 0.0}
    for start in range(0, len(images), EVAL_BATCH):
        x = to_float(images[start: start + EVAL_BATCH])
        if likelihood.binarize:
            x = binarized(x, gen)
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
        sums["recon_nll"] += likelihood.nll(model.decode(z), x, model.log_sigma).sum().item()
        sums["reg"] += regularizer(objective)(mu, logvar).sum().item()
        sums["kl"] += REGULARIZERS["kl"](mu, logvar).sum().item()
        sums["bhattacharyya"] += REGULARIZERS["bhattacharyya"](mu, logvar).sum().item()
    means = {k: v / len(images) for k, v in sums.items()}
    means["loss"] = means["recon_nll"] + objective.beta * means["reg"]
    model.train()
    return means


def train_epoch(model: VAE, optimizer: torch.optim.Optimizer, images: Tensor, config: Config,
                bar: tqdm, first_step: int = 1) -> dict[str, float]:
    """One pass over a fresh permutation of `images`; returns the running means of the terms.
    `first_step` numbers this epoch's first optimizer step, for the beta warm-up."""
    objective, batch_size = config.objective, config.train.batch_size
    binarize = LIKELIHOODS[objective.likelihood].binarize
    order = torch.randperm(len(images))
    totals = torch.zeros(3)  # loss, recon_nll, reg, summed over images (no per-step host sync)
    for step, start in enumerate(range(0, len(images), batch_size)):
        x = to_float(images[order[start: start + batch_size]])
        if binarize:
            x = binarized(x)
        terms = loss_terms(model, x, objective, beta=beta_at(objective, first_step + step))
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        totals += torch.stack([terms.loss, terms.recon_nll, terms.reg]).detach() * len(x)
        bar.update(len(x))
        if step % POSTFIX_EVERY == 0:
            seen = min(start + batch_size, len(images))
            loss, recon, reg = (totals / seen).tolist()
            bar.set_postfix(loss=f"{loss:.2f}", recon=f"{recon:.2f}", reg=f"{reg:.2f}", refresh=False)
    loss, recon, reg = (totals / len(images)).tolist()
    return {"loss": loss, "recon_nll": recon, "reg": reg}


def write_pictures(model: VAE, data: Dataset, run_dir: Path, seed: int) -> None:
    """originals.png: the first 64 test images; reconstructions.png: the decoder's mean at the
    posterior mean mu of each, at the same grid position; samples.png: decoder means of z ~ N(0, I)."""
    model.eval()
    with torch.inference_mode():
        originals = to_float(data.test_images[:PICTURE_COUNT])
        mu, _ = model.encode(originals)
        reconstructions = model.decode_mean(mu)
        z = torch.randn(PICTURE_COUNT, mu.shape[1], generator=torch.Generator().manual_seed(seed))
        samples = model.decode_mean(z)
    pictures.save_grid(originals, run_dir / "originals.png")
    pictures.save_grid(reconstructions, run_dir / "reconstructions.png")
    pictures.save_grid(samples, run_dir / "samples.png")


def absolute_paths(config: Config) -> Config:
    """The same config with its data paths made absolute, so that the saved config.toml still
    finds the data when `bdvae reconstruct` runs from another folder."""
    data = config.data
    resolved = {k: str(Path(v).expanduser().absolute()) for k in ("path", "labels_path", "data_dir")
                if (v := getattr(data, k)) is not None}
    return dataclasses.replace(config, data=dataclasses.replace(data, **resolved))


def train(config: Config, run_dir: Path, overwrite: bool = False, progress: bool | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Train a VAE as configured and fill `run_dir`; returns `run_dir`.

    `progress=None` shows the progress bar only on a terminal.
    """
    run_dir = Path(run_dir)
    checkpoint.check_run_dir(run_dir, overwrite)  # before the slow parts, and before anything is written
    config = absolute_paths(config)
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    data = load_dataset(config.data, log=log)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.objective, data.shape)
    checkpoint.prepare_run_dir(run_dir, overwrite)  # only once data and model are known to be good
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    log(f"training on {len(data.train_images)} images {tuple(data.shape)} from {data.source}; "
        f"{sum(p.numel() for p in model.parameters())} parameters; run directory {run_dir}")

    rows: list[dict[str, float]] = []
    started = time.perf_counter()
    model.train()
    for epoch in range(1, config.train.epochs + 1):
        t0 = time.perf_counter()
        with tqdm(total=len(data.train_images), desc=f"epoch {epoch}/{config.train.epochs}", unit="img",
                  disable=None if progress is None else not progress, leave=False) as bar:
            steps_per_epoch = -(-len(data.train_images) // config.train.batch_size)
            train_means = train_epoch(model, optimizer, data.train_images, config, bar,
                                      first_step=(epoch - 1) * steps_per_epoch + 1)
        test_means = evaluate_terms(model, data.test_images, config, seed=config.train.seed)
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_means.items()},
               **{f"test_{k}": v for k, v in test_means.items()}, "seconds": time.perf_counter() - t0}
        rows.append(row)
        checkpoint.write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
        pictures.save_loss_curves(rows, run_dir / "loss_curve.png")
        log(f"epoch {epoch}: train loss {row['train_loss']:.2f} (recon {row['train_recon_nll']:.2f}, "
            f"reg {row['train_reg']:.2f}); test loss {row['test_loss']:.2f} (recon {row['test_recon_nll']:.2f}, "
            f"KL {row['test_kl']:.2f}, BD {row['test_bhattacharyya']:.2f}); {row['seconds']:.1f} s")

    checkpoint.save_run(run_dir, model, config, {
        "image_shape": list(data.shape), "data_source": data.source, "epochs": config.train.epochs,
        "train_images": len(data.train_images), "test_images": len(data.test_images),
        "seconds": round(time.perf_counter() - started, 1)})
    write_pictures(model, data, run_dir, seed=config.train.seed)
    return run_dir
