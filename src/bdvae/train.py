"""Training: Adam over shuffled mini-batches drawn by indexing one in-memory uint8 tensor.

After each epoch the loss terms on the training set (running means) and on the test set go to
metrics.jsonl and loss_curve.png; at the end the weights, the config and the three pictures are
written into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdvae import checkpoint, distributed, pictures
from bdvae import config as config_lib
from bdvae.config import Config
from bdvae.data import Dataset, load_dataset
from bdvae.distributed import Context, shard
from bdvae.errors import BdvaeError, first_line
from bdvae.likelihoods import LIKELIHOODS
from bdvae.model import VAE, build_model
from bdvae.objective import Objective, beta_at, regularizer
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
def evaluate_terms(model: VAE, images: Tensor, config: Config, seed: int, ctx: Context = Context()) -> dict[str, float]:
    """Mean loss terms over `images` (uint8), with fixed noise so that epochs are comparable;
    both KL and BD of the same posteriors are reported whatever the model is trained with. With
    several ranks each computes every world_size-th chunk and the sums are all-reduced; every
    rank draws every chunk's noise, so the result does not depend on the world size."""
    model.eval()
    ctx.sync_buffers(model)  # the ranks' last training step moved their BatchNorm statistics apart
    objective = config.objective
    likelihood = LIKELIHOODS[objective.likelihood]
    gen = torch.Generator().manual_seed(seed)
    sums = torch.zeros(4, dtype=torch.float64)  # recon_nll, reg, kl, bhattacharyya
    for i, start in enumerate(range(0, len(images), EVAL_BATCH)):
        x = to_float(images[start: start + EVAL_BATCH])
        if likelihood.binarize:
            x = binarized(x, gen)
        eps = torch.randn(len(x), config.model.latent_dim, generator=gen)
        if i % ctx.world_size != ctx.rank:
            continue
        x = x.to(ctx.device)
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps.to(ctx.device)
        sums += torch.stack([likelihood.nll(model.decode(z), x, model.log_sigma).sum(),
                             regularizer(objective)(mu, logvar).sum(), REGULARIZERS["kl"](mu, logvar).sum(),
                             REGULARIZERS["bhattacharyya"](mu, logvar).sum()]).cpu().double()
    recon_nll, reg, kl, bd = (ctx.all_reduce_sum(sums) / len(images)).tolist()
    model.train()
    return {"recon_nll": recon_nll, "reg": reg, "kl": kl, "bhattacharyya": bd,
            "loss": recon_nll + objective.beta * reg}


def lr_at(train: config_lib.TrainConfig, progress: float) -> float:
    """The learning rate when a fraction `progress` in [0, 1) of the epochs is done: train.lr, or
    under "cosine" lr (1 + cos(pi progress)) / 2 (Loshchilov & Hutter 2017, without restarts).
    A function of the images seen, not of the step count, so that it does not depend on the
    number of processes a resumed run has."""
    if train.lr_schedule == "cosine":
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.lr


@dataclass
class Position:
    """Where training stands: the next epoch (1-based), the next image of that epoch's order, the
    optimizer steps taken, the epoch's data order and running sums, and the finished epochs' rows."""

    epoch: int = 1
    next_start: int = 0
    global_step: int = 0
    order: Tensor | None = None  # this epoch's permutation; None before it is drawn
    totals: Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3))  # loss, recon_nll, reg sums
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    skipped: int = 0  # batches of this epoch skipped for a non-finite loss or gradient
    skipped_images: int = 0


class NonFiniteError(BdvaeError):
    """A non-finite loss or gradient, with train.skip_nonfinite off."""


def backward_shard(loss: nn.Module, x: Tensor, eps: Tensor, total: int, beta: float, ctx: Context = Context(),
                   mixed_precision: bool = False) -> Tensor:
    """One step's loss and gradient, this rank's part: x (B_r, C, H, W) and its noise eps (B_r, D)
    are this rank's shard of a global batch of `total` images. `loss` is an Objective, under
    DistributedDataParallel when there are several ranks. Leaves in each parameter's .grad the
    gradient of the mean loss over the `total` images; returns the loss sums over them (3,), the
    same on every rank. `mixed_precision`: the forward under bf16 autocast (the loss terms are
    summed in fp32)."""
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=mixed_precision):
        sums = loss(x.to(ctx.device, memory_format=torch.channels_last), eps.to(ctx.device), beta)
    # DDP averages the ranks' gradients; scaling each rank's sum by world_size / total makes that
    # average the gradient of the sum over all images divided by their number, whatever the shard sizes.
    (sums[0] * (ctx.world_size / total)).backward()
    return ctx.all_reduce_sum(sums.detach())  # in place: `sums` is not used after its backward


def train_epoch(model: VAE, optimizer: torch.optim.Optimizer, images: Tensor, config: Config, bar: tqdm,
                pos: Position, after_step: Callable[[], None] = lambda: None, ctx: Context = Context(),
                loss: nn.Module | None = None) -> dict[str, float]:
    """Continue the epoch at `pos` to its end, updating `pos` after every step (then `after_step`
    may save it); returns the running means of the terms over the epoch. `loss` is the Objective
    to differentiate (wrapped for several ranks; default: Objective(model)). Each step takes a
    global batch of batch_size images per rank."""
    objective, batch_size = config.objective, config.train.batch_size * ctx.world_size
    binarize = LIKELIHOODS[objective.likelihood].binarize
    loss = Objective(model, objective) if loss is None else loss
    mixed_precision = ctx.bf16_autocast(config.train.mixed_precision)
    if pos.order is None:  # a new epoch: drawn from the global RNG, which a checkpoint restores
        pos.order, pos.totals, pos.next_start = torch.randperm(len(images)), torch.zeros(3), 0
        pos.skipped = pos.skipped_images = 0
    bar.update(pos.next_start)
    while pos.next_start < len(images):
        start = pos.next_start
        batch = pos.order[start: start + batch_size]  # the global batch's images, (G,)
        part = shard(len(batch), ctx.rank, ctx.world_size)
        # Every rank draws the whole global batch's noise, so the ranks' RNGs stay in lockstep and
        # the noise does not depend on how the batch is split; only this rank's images are loaded,
        # except for binarization, whose draws need every image of the batch.
        if binarize:
            x = binarized(to_float(images[batch]))[part]
        else:
            x = to_float(images[batch[part]])  # (B_r, C, H, W)
        eps = torch.randn(len(batch), config.model.latent_dim)[part]  # (B_r, D)
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config.train, (pos.epoch - 1 + start / len(images)) / config.train.epochs)
        beta = beta_at(objective, pos.global_step + 1)
        stacked = backward_shard(loss, x, eps, len(batch), beta, ctx, mixed_precision).cpu()
        # The total gradient norm is NaN or inf if any gradient is; checking it with the loss costs
        # one host synchronisation per step, which on a CPU (where ops run eagerly) is nearly free.
        # After DDP's all-reduce every rank holds the same gradients and sums: all decide alike.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        pos.global_step += 1
        pos.next_start = min(start + batch_size, len(images))
        if not bool(torch.isfinite(stacked).all() & torch.isfinite(grad_norm)):
            loss_sum, recon, reg = (stacked / len(batch)).tolist()
            values = f"loss={loss_sum}, recon_nll={recon}, reg={reg}, gradient norm={grad_norm.item()}"
            if not config.train.skip_nonfinite:
                raise NonFiniteError(f"step {pos.global_step}: non-finite loss or gradient ({values})")
            optimizer.zero_grad(set_to_none=True)  # the batch is skipped: no update, not in the sums
            pos.skipped += 1
            pos.skipped_images += len(batch)
        else:
            optimizer.step()
            pos.totals += stacked  # sums over images, kept as a tensor
        bar.update(len(batch))
        if pos.global_step % POSTFIX_EVERY == 0:
            loss_sum, recon, reg = (pos.totals / max(1, pos.next_start - pos.skipped_images)).tolist()
            bar.set_postfix(loss=f"{loss_sum:.2f}", recon=f"{recon:.2f}", reg=f"{reg:.2f}", refresh=False)
        after_step()
    used = len(images) - pos.skipped_images  # 0 only if every batch was skipped: the means are then NaN
    loss_sum, recon, reg = (pos.totals / used if used else torch.full((3,), math.nan)).tolist()
    return {"loss": loss_sum, "recon_nll": recon, "reg": reg, "skipped_batches": pos.skipped}


def save_training_state(run_dir: Path, model: VAE, optimizer: torch.optim.Optimizer, pos: Position) -> None:
    """Everything `resume` needs to continue exactly: weights, Adam's moments and step counts, the
    torch, numpy and Python RNG states, the epoch's data order and running sums, and the rows so far."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"optimizer.{i}.{name}": t for i, st in opt["state"].items() for name, t in st.items()}
    tensors |= {"rng.torch": torch.get_rng_state(), "totals": pos.totals}
    if pos.order is not None:
        tensors["order"] = pos.order
    np_state = np.random.get_state()
    state = {"epoch": pos.epoch, "next_start": pos.next_start, "global_step": pos.global_step, "rows": pos.rows,
             "skipped": pos.skipped, "skipped_images": pos.skipped_images,
             "param_groups": opt["param_groups"],
             "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "rng_python": random.getstate()}
    checkpoint.save_state(run_dir, pos.global_step, tensors, state)


def restore_training_state(tensors: dict[str, Tensor], state: dict, model: VAE,
                           optimizer: torch.optim.Optimizer) -> Position:
    """The inverse of save_training_state: loads weights, optimizer and RNGs; returns the position."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = t
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    for param, moments in optimizer.state.items():  # saved contiguous: the moments go back to the
        for name, t in moments.items():           # weights' layout (channels-last), as Adam made them
            if name != "step":                    # (the step count stays where Adam keeps it)
                moments[name] = torch.empty_like(param).copy_(t)
    torch.set_rng_state(tensors["rng.torch"])
    name, keys, *rest = state["rng_numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return Position(epoch=state["epoch"], next_start=state["next_start"], global_step=state["global_step"],
                    order=tensors.get("order"), totals=tensors["totals"].clone(), rows=state["rows"],
                    skipped=state["skipped"], skipped_images=state["skipped_images"])


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


def _setup(config: Config, ctx: Context, log: Callable[[str], None]) -> tuple[Dataset, VAE]:
    """Threads, data, and the freshly initialised model (seeded by train.seed, alike on every rank)."""
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    data = load_dataset(config.data, log=log)
    torch.manual_seed(config.train.seed)
    return data, build_model(config.model, config.objective, data.shape).to(ctx.device)


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


def train(config: Config, run_dir: Path, overwrite: bool = False, progress: bool | None = None,
          log: Callable[[str], None] = print, device: str = "auto") -> Path:
    """Train a VAE as configured and fill `run_dir`; returns `run_dir`.

    `progress=None` shows the progress bar only on a terminal. `device` is "auto", "cpu" or "cuda".
    Launched by torchrun, the processes train together (see distributed.py) and rank 0 writes.
    """
    run_dir = Path(run_dir)
    with distributed.joined(device) as ctx:
        if ctx.is_main:
            checkpoint.check_run_dir(run_dir, overwrite)  # before the slow parts, and before anything is written
        config = absolute_paths(config)
        data, model = _setup(config, ctx, log if ctx.is_main else _quiet)
        if ctx.is_main:
            checkpoint.prepare_run_dir(run_dir, overwrite)  # only once data and model are known to be good
            checkpoint.write_text(run_dir / checkpoint.CONFIG_FILE, config_lib.dumps(config))  # what --resume reads
        return _fit(config, run_dir, data, model, None, ctx, progress, log)


def check_resumable(run_dir: Path) -> None:
    """An error unless `run_dir` holds a started, unfinished run."""
    if not (run_dir / checkpoint.CONFIG_FILE).is_file():
        raise BdvaeError(f"{run_dir}: nothing to resume (no {checkpoint.CONFIG_FILE})")
    if (run_dir / checkpoint.RUN_FILE).is_file():
        raise BdvaeError(f"{run_dir}: the run is finished already; nothing to resume")


def resume(run_dir: Path, progress: bool | None = None, log: Callable[[str], None] = print,
           device: str = "auto") -> Path:
    """Continue an interrupted run from its newest good training state (or from the start if it
    was stopped before the first one), exactly as if it had never stopped when the number of
    processes is the same. The state does not depend on that number: a run started with 2 may
    resume with 1, or the other way, at the same image of the same epoch; train.batch_size being
    per process, the global batch then changes, so the rest is another run from that point."""
    run_dir = Path(run_dir)
    check_resumable(run_dir)
    with distributed.joined(device) as ctx:
        log = log if ctx.is_main else _quiet
        config = config_lib.load(run_dir / checkpoint.CONFIG_FILE)
        data, model = _setup(config, ctx, log)
        state = checkpoint.latest_state(run_dir, log)
        if state is None:
            log(f"{run_dir}: no training state saved yet; starting from the beginning")
        return _fit(config, run_dir, data, model, state, ctx, progress, log)


def _fit(config: Config, run_dir: Path, data: Dataset, model: VAE, state: tuple[dict, dict] | None, ctx: Context,
         progress: bool | None, log: Callable[[str], None]) -> Path:
    """The training loop from a fresh start (`state` None) or a saved training state."""
    # Channels-last: oneDNN's convolutions then need no layout reorders (1.1x in fp32, 1.13x in
    # bf16 on the reference model; README, Performance). Weights on disk stay in the usual layout.
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    try:
        pos = Position() if state is None else restore_training_state(*state, model, optimizer)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # a state from another model or version
        raise BdvaeError(f"{run_dir / checkpoint.STATES_DIR}: the checkpoint does not fit this run's config "
                         f"or this version of bdvae ({first_line(e)})") from None
    n = len(data.train_images)
    if pos.order is not None and (len(pos.order) != n or not 0 <= pos.next_start <= n):
        raise BdvaeError(f"{run_dir / checkpoint.STATES_DIR}: the checkpoint was taken on {len(pos.order)} training "
                         f"images, the data now gives {n}; was {run_dir / checkpoint.CONFIG_FILE} edited?")
    if not ctx.is_main:
        log, progress = _quiet, False
    if state is not None:
        log(f"resuming at epoch {pos.epoch}, image {pos.next_start} of {n}, after {pos.global_step} steps")
    processes = f"; {ctx.world_size} processes, global batch {config.train.batch_size * ctx.world_size}" \
        if ctx.world_size > 1 else ""
    mixed_precision = ctx.bf16_autocast(config.train.mixed_precision)
    precision = ", bf16 autocast" if mixed_precision else ""
    log(f"training on {n} images {tuple(data.shape)} from {data.source}; "
        f"{sum(p.numel() for p in model.parameters())} parameters; {ctx.device}{precision}{processes}; run directory {run_dir}")
    loss = distributed.wrap(Objective(model, config.objective), ctx)
    every = config.train.checkpoint_every

    def after_step() -> None:
        if ctx.is_main and every and pos.global_step % every == 0 and pos.next_start < n:
            save_training_state(run_dir, model, optimizer, pos)

    model.train()
    while pos.epoch <= config.train.epochs:
        epoch, t0 = pos.epoch, time.perf_counter()
        with tqdm(total=n, desc=f"epoch {epoch}/{config.train.epochs}", unit="img",
                  disable=None if progress is None else not progress, leave=False) as bar:
            try:
                train_means = train_epoch(model, optimizer, data.train_images, config, bar, pos, after_step, ctx, loss)
            except NonFiniteError as e:
                kept = checkpoint.state_paths(run_dir)
                where = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved yet"
                raise BdvaeError(f"{e}; training stopped and {where}; to skip such batches instead, set "
                                 f"skip_nonfinite = true under [train] in {run_dir / checkpoint.CONFIG_FILE} "
                                 "and run bdvae train --resume") from None
        skipped = train_means.pop("skipped_batches")
        if skipped:
            log(f"epoch {epoch}: skipped {skipped} batches with a non-finite loss or gradient")
        test_means = evaluate_terms(model, data.test_images, config, seed=config.train.seed, ctx=ctx)
        row = {"epoch": epoch, "skipped_batches": skipped, **{f"train_{k}": v for k, v in train_means.items()},
               **{f"test_{k}": v for k, v in test_means.items()}, "seconds": time.perf_counter() - t0}
        pos.rows.append(row)
        pos.epoch, pos.next_start, pos.order = epoch + 1, 0, None
        if ctx.is_main:
            checkpoint.write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in pos.rows))
            pictures.save_loss_curves(pos.rows, run_dir / "loss_curve.png")
            save_training_state(run_dir, model, optimizer, pos)  # the epoch's end, its row included
        log(f"epoch {epoch}: train loss {row['train_loss']:.2f} (recon {row['train_recon_nll']:.2f}, "
            f"reg {row['train_reg']:.2f}); test loss {row['test_loss']:.2f} (recon {row['test_recon_nll']:.2f}, "
            f"KL {row['test_kl']:.2f}, BD {row['test_bhattacharyya']:.2f}); {row['seconds']:.1f} s")

    if ctx.is_main:
        model.cpu()
        checkpoint.save_run(run_dir, model, config, {
            "image_shape": list(data.shape), "data_source": data.source, "epochs": config.train.epochs,
            "train_images": n, "test_images": len(data.test_images), "processes": ctx.world_size,
            "device": ctx.device.type, "precision": "bf16 autocast" if mixed_precision else "fp32",
            "seconds": round(sum(r["seconds"] for r in pos.rows), 1)})
        write_pictures(model, data, run_dir, seed=config.train.seed)
    return run_dir
