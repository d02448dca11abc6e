"""Training: Adam over shuffled mini-batches drawn by indexing one in-memory uint8 tensor.

After each epoch the loss terms on the training set (running means) and on the test set go to
the run directory's metrics log and loss curve; at the end the weights, the config and the three
pictures (rundir.py names every file). Every random draw of training comes from one
torch.Generator, whose state is part of the training state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdvae import distributed, logs, pictures, rundir, states, steps, tracking
from bdvae.aggregates import NEEDS_PRIOR_DRAWS
from bdvae.config import Config, TrainConfig, absolute_paths
from bdvae.data import Dataset, load_dataset
from bdvae.devices import check_memory, keep_freed_memory
from bdvae.distributed import Context, shard
from bdvae.errors import BdvaeError, first_line
from bdvae.likelihoods import LIKELIHOODS, to_float
from bdvae.model import VAE, activation_bytes, build_model
from bdvae.objective import Objective, aggregate_term, beta_at, image_terms
from bdvae.regularizers import REGULARIZERS
from bdvae.steps import (DeferredChecks, DeviceStep, NonFiniteError, host_update, nonfinite_message, step_on_device,
                         step_parts)

EVAL_BATCH = 1000  # test images per forward pass of the epoch's test pass
POSTFIX_EVERY = 25  # steps between progress-bar updates (each one synchronises on the loss)


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
    # recon_nll, reg, kl, bhattacharyya, aggregate, summed where the model runs: read back once
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    for i, start in enumerate(range(0, len(images), EVAL_BATCH)):
        x = likelihood.targets(images[start: start + EVAL_BATCH], gen)
        eps = torch.randn(len(x), config.model.latent_dim, generator=gen)
        prior = (torch.randn(len(x), config.model.latent_dim, generator=gen)
                 if objective.aggregate in NEEDS_PRIOR_DRAWS else None)
        if i % ctx.world_size != ctx.rank:
            continue
        terms = image_terms(model, x.to(ctx.device), objective, eps.to(ctx.device))
        mu, logvar = terms.mu, terms.logvar
        # The aggregate term of each chunk of EVAL_BATCH test images, weighted by its size.
        aggregate = (len(x) * aggregate_term(objective, terms, None if prior is None else prior.to(ctx.device))
                     if objective.aggregate is not None else mu.new_zeros(()))
        sums += torch.stack([terms.recon_nll.sum(), terms.reg.sum(), REGULARIZERS["kl"](mu, logvar).sum(),
                             REGULARIZERS["bhattacharyya"](mu, logvar).sum(), aggregate]).double()
    recon_nll, reg, kl, bd, aggregate = (ctx.all_reduce_sum(sums) / len(images)).tolist()
    model.train()
    result = {"recon_nll": recon_nll, "reg": reg, "kl": kl, "bhattacharyya": bd,
              "loss": recon_nll + objective.beta * reg}
    if objective.aggregate is not None:
        result["aggregate"] = aggregate
        result["loss"] += objective.aggregate_weight * aggregate
    return result


def lr_at(train: TrainConfig, progress: float) -> float:
    """The learning rate when a fraction `progress` in [0, 1) of the epochs is done: train.lr, or
    under "cosine" lr (1 + cos(pi progress)) / 2 (Loshchilov & Hutter 2017, without restarts).
    A function of the images seen, not of the step count, so that it does not depend on the
    number of processes a resumed run has."""
    if train.lr_schedule == "cosine":
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.lr


def train_epoch(model: VAE, optimizer: torch.optim.Optimizer, images: Tensor, config: Config, bar: tqdm,
                pos: states.Position, generator: torch.Generator, after_step: Callable[[], None] = lambda: None,
                ctx: Context = Context(), loss: nn.Module | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                device_step: DeviceStep | None = None) -> dict[str, float]:
    """Continue the epoch at `pos` to its end, updating `pos` after every step (then `after_step`
    may save it); returns the running means of the terms over the epoch. Every random draw (the
    epoch's order, binarization, the noise eps) comes from `generator`. `loss` is the Objective
    to differentiate (wrapped for several ranks; default: Objective(model)). Each step takes a
    global batch of batch_size images per rank. Every train.log_every steps `on_step` gets the
    step's figures (tracking.py). With the step on the device (steps.step_on_device), `images`,
    the generator and `optimizer` are there (steps.step_parts), the checks are deferred, and
    `device_step` (default: a new one) makes the update, captured where it can be."""
    objective, train, batch_size = config.objective, config.train, config.train.batch_size * ctx.world_size
    likelihood = LIKELIHOODS[objective.likelihood]
    loss = Objective(model, objective, ctx.gather_rows) if loss is None else loss
    prior_draws = objective.aggregate in NEEDS_PRIOR_DRAWS
    mixed_precision = ctx.bf16_autocast(train.mixed_precision)
    checks = DeferredChecks(ctx.device) if step_on_device(train, ctx.device) else None
    if checks is not None and device_step is None:
        device_step = steps.device_step(model, optimizer, loss, config, ctx, mixed_precision)
    sums_on = ctx.device if checks else torch.device("cpu")
    if pos.order is None:  # a new epoch: drawn from the generator, whose state a checkpoint holds
        pos.order = torch.randperm(len(images), generator=generator, device=generator.device)
        pos.totals, pos.next_start, pos.skipped, pos.skipped_images = torch.zeros(3), 0, 0, 0
    pos.order, pos.totals = pos.order.to(images.device), pos.totals.to(sums_on)  # as a saved state has them: on the CPU
    bar.update(pos.next_start)
    while pos.next_start < len(images):
        start = pos.next_start
        batch = pos.order[start: start + batch_size]  # the global batch's images, (G,)
        part = shard(len(batch), ctx.rank, ctx.world_size)
        # Every rank draws the whole global batch's noise, so the ranks' RNGs stay in lockstep and
        # the noise does not depend on how the batch is split; only this rank's images are loaded,
        # except for binarization, whose draws need every image of the batch.
        if likelihood.binarize:
            x = likelihood.targets(images[batch], generator)[part]
        else:
            x = to_float(images[batch[part]])  # (B_r, C, H, W)
        eps = torch.randn(len(batch), config.model.latent_dim, generator=generator, device=generator.device)[part]
        prior = (torch.randn(len(batch), config.model.latent_dim, generator=generator, device=generator.device)
                 if prior_draws else None)
        lr = lr_at(train, (pos.epoch - 1 + start / len(images)) / train.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        beta = beta_at(objective, pos.global_step + 1)
        pos.global_step += 1
        pos.next_start = min(start + batch_size, len(images))
        if device_step is not None and checks is not None:  # nothing here waits for the device
            stacked, grad_norm = device_step(x, eps, prior, len(batch), beta, lr)
            bad = checks.record(pos.global_step, stacked, grad_norm, len(batch))
            pos.totals += torch.where(bad, 0.0, stacked)
        else:
            stacked, grad_norm, finite = host_update(model, optimizer, loss, x, eps, prior, len(batch), beta, ctx,
                                                     mixed_precision)
            if not finite:
                message = nonfinite_message(pos.global_step, *(stacked / len(batch)).tolist(), grad_norm.item())
                if not train.skip_nonfinite:
                    raise NonFiniteError(message)
                pos.skipped += 1  # the batch is skipped: no update, not in the sums
                pos.skipped_images += len(batch)
            else:
                pos.totals += stacked  # sums over images, kept as a tensor
        bar.update(len(batch))
        logged = on_step is not None and train.log_every and pos.global_step % train.log_every == 0
        postfix = pos.global_step % POSTFIX_EVERY == 0
        if checks is not None and (logged or postfix or train.checkpoint_every
                                   and pos.global_step % train.checkpoint_every == 0):
            checks.settle(pos, train.skip_nonfinite)
        if logged:
            loss_mean, recon, reg = (stacked / len(batch)).tolist()  # this step's batch: NaN where it was skipped
            on_step(pos.global_step, {"loss": loss_mean, "recon_nll": recon, "reg": reg, "lr": lr,  # type: ignore[misc]
                                      "beta": beta, "grad_norm": grad_norm.item()})
        if postfix:
            loss_sum, recon, reg = (pos.totals / max(1, pos.next_start - pos.skipped_images)).tolist()
            bar.set_postfix(loss=f"{loss_sum:.2f}", recon=f"{recon:.2f}", reg=f"{reg:.2f}", refresh=False)
        after_step()
    if checks is not None:
        checks.settle(pos, train.skip_nonfinite)
    used = len(images) - pos.skipped_images  # 0 only if every batch was skipped: the means are then NaN
    loss_sum, recon, reg = (pos.totals / used if used else torch.full((3,), math.nan)).tolist()
    return {"loss": loss_sum, "recon_nll": recon, "reg": reg, "skipped_batches": pos.skipped}


def _setup(config: Config, ctx: Context, log: Callable[[str], None]) -> tuple[Dataset, VAE, torch.Generator]:
    """Threads, data, the freshly initialised model and the generator training draws from, all
    seeded by train.seed, alike on every rank. The generator continues the stream that seeded the
    weights (torch.manual_seed(seed), then the initialisation's draws), so runs are those of the
    versions that drew from torch's global generator, bit for bit."""
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    data = load_dataset(config.data, log=log)
    rundir.check_model_size(config.model, config.objective, data.shape, ctx.device)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.objective, data.shape).to(ctx.device)
    _check_step_size(config, data, model, ctx.device)
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    return data, model, generator


def _check_step_size(config: Config, data: Dataset, model: VAE, device: torch.device) -> None:
    """Refuse in one line a training step that cannot fit: the weights, their gradients, Adam's two
    moments, one batch's activations (halved, for bf16 autocast; twice for a captured step, whose
    graph keeps them while the epoch's last batch runs eagerly) and, with the step on a GPU, the
    training images (uint8): a lower bound of its memory."""
    per_image = (activation_bytes(model.encoder, torch.zeros(1, *data.shape, device=device))
                 + activation_bytes(model.decoder, torch.zeros(1, config.model.latent_dim, device=device)))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = min(config.train.batch_size, len(data.train_images))  # a batch holds at most the whole set
    on_gpu = step_on_device(config.train, device) and device.type != "cpu"
    resident = data.train_images.numel() if on_gpu else 0
    copies = 2 if on_gpu and steps.place(config.train, device) == "graph" else 1  # the graph's pool and the last batch's
    check_memory(4 * weights + copies * batch * per_image // 2 + resident, f"a training step of train.batch_size={batch:,}",
                 device, "use a smaller train.batch_size")


def _callbacks(callbacks: Sequence[Any]) -> list[Any]:
    """`callbacks` as a list, or one line if it is not a sequence of them."""
    if not isinstance(callbacks, (list, tuple)):
        raise BdvaeError(f"callbacks must be a list of callbacks, got {type(callbacks).__name__}")
    return list(callbacks)


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


def train(config: Config, run_dir: Path, overwrite: bool = False, progress: bool | None = None,
          log: Callable[[str], None] = logs.info, device: str = "auto", callbacks: Sequence[Any] = ()) -> Path:
    """Train a VAE as configured and fill `run_dir`; returns `run_dir`.

    `progress=None` shows the progress bar only on a terminal. `device` is "auto", "cpu" or "cuda".
    Launched by torchrun, the processes train together (see distributed.py) and rank 0 writes.
    `callbacks` (tracking.Callback) hear of every step, checkpoint and epoch on rank 0.
    """
    run_dir = Path(run_dir)
    callbacks = _callbacks(callbacks)  # before anything is written
    if config.train.tensorboard:
        tracking.summary_writer()  # a missing tensorboard package fails here, before the slow parts
    with distributed.joined(device) as ctx:
        if ctx.is_main:
            rundir.check_new(run_dir, overwrite)  # before the slow parts, and before anything is written
        config = absolute_paths(config)
        data, model, generator = _setup(config, ctx, log if ctx.is_main else _quiet)
        if ctx.is_main:
            rundir.prepare(run_dir, overwrite)  # only once data and model are known to be good
            rundir.write_config(run_dir, config)  # what --resume reads
        return _fit(config, run_dir, data, model, generator, None, ctx, progress, log, callbacks)


def resume(run_dir: Path, progress: bool | None = None, log: Callable[[str], None] = logs.info,
           device: str = "auto", callbacks: Sequence[Any] = ()) -> Path:
    """Continue an interrupted run from its newest good training state (or from the start if it
    was stopped before the first one), exactly as if it had never stopped when the number of
    processes is the same. The state does not depend on that number: a run started with 2 may
    resume with 1, or the other way, at the same image of the same epoch; train.batch_size being
    per process, the global batch then changes, so the rest is another run from that point."""
    run_dir = Path(run_dir)
    callbacks = _callbacks(callbacks)
    rundir.check_resumable(run_dir)
    with distributed.joined(device) as ctx:
        log = log if ctx.is_main else _quiet
        config = rundir.read_config(run_dir)
        if config.train.tensorboard:
            tracking.summary_writer()
        data, model, generator = _setup(config, ctx, log)
        state = rundir.latest_state(run_dir, log)
        if state is None:
            saved = "no training state verifies" if rundir.state_paths(run_dir) else "no training state saved yet"
            log(f"{run_dir}: {saved}; starting from the beginning")
        return _fit(config, run_dir, data, model, generator, state, ctx, progress, log, callbacks, resuming=True)


def _fit(config: Config, run_dir: Path, data: Dataset, model: VAE, generator: torch.Generator,
         state: tuple[dict, dict] | None, ctx: Context, progress: bool | None, log: Callable[[str], None],
         callbacks: Sequence[Any] = (), resuming: bool = False) -> Path:
    """The training loop from a fresh start (`state` None) or a saved training state; `resuming`:
    a run stopped before, whose TensorBoard events after `state` (all, without one) are purged."""
    # Channels-last: oneDNN's convolutions then need no layout reorders (docs/results/performance.md).
    # Weights on disk stay in the usual layout.
    model.to(memory_format=torch.channels_last)
    # Freed activations stay in malloc's heap for the next step instead of coming back as fresh,
    # page-faulted memory (docs/results/performance.md).
    keep_freed_memory()
    on_device, optimizer, images, generator = step_parts(model, config, ctx.device, data.train_images, generator)
    checkpoints = run_dir / rundir.STATES_DIR
    drawn_on = None if state is None else state[1].get("generator_device", "cpu")
    try:
        pos = states.Position() if state is None else states.unpack(
            *state, model, optimizer, generator if drawn_on == generator.device.type else None)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # a state from another model or version
        raise BdvaeError(f"{checkpoints}: the checkpoint does not fit this run's config "
                         f"or this version of bdvae ({first_line(e)})") from None
    if drawn_on not in (None, generator.device.type):
        generator.manual_seed(config.train.seed + pos.global_step)
        log(f"the training state's random draws came from a generator on the {drawn_on}, this run's are on the "
            f"{generator.device.type}: a new stream seeded by train.seed and the step goes on from here, so the rest "
            "is not bit for bit the run that was interrupted")
    n = len(data.train_images)
    if pos.order is not None and (len(pos.order) != n or not 0 <= pos.next_start <= n):
        raise BdvaeError(f"{checkpoints}: the checkpoint was taken on {len(pos.order)} training "
                         f"images, the data now gives {n}; was {run_dir / rundir.CONFIG_FILE} edited?")
    callbacks = list(callbacks)
    if ctx.is_main and config.train.tensorboard:
        callbacks.append(tracking.TensorBoard(run_dir / rundir.TENSORBOARD_DIR,
                                              resumed_after=pos.global_step if resuming else None))
    if not ctx.is_main:
        log, progress, callbacks = _quiet, False, []
    if state is not None:
        log(f"resuming at epoch {pos.epoch}, image {pos.next_start} of {n}, after {pos.global_step} steps")
    processes = f"; {ctx.world_size} processes, global batch {config.train.batch_size * ctx.world_size}" \
        if ctx.world_size > 1 else ""
    mixed_precision = ctx.bf16_autocast(config.train.mixed_precision)
    precision = ", bf16 autocast" if mixed_precision else ""
    step_text = "the step on the device" if on_device else "the step checked on the host"
    log(f"training on {n} images {tuple(data.shape)} from {data.source}; "
        f"{sum(p.numel() for p in model.parameters())} parameters; {ctx.device}{precision}, {step_text}{processes}; "
        f"run directory {run_dir}")
    loss = distributed.wrap(Objective(model, config.objective, ctx.gather_rows), ctx)
    update = steps.device_step(model, optimizer, loss, config, ctx, mixed_precision, log) if on_device else None
    every = config.train.checkpoint_every

    def after_step() -> None:
        if ctx.is_main and every and pos.global_step % every == 0 and pos.next_start < n:
            tracking.call(callbacks, "on_checkpoint", pos.global_step)
            rundir.save_training_state(run_dir, model, optimizer, pos, generator)

    def on_step(step: int, figures: dict[str, float]) -> None:
        tracking.call(callbacks, "on_step", step, figures)

    model.train()
    while pos.epoch <= config.train.epochs:
        epoch, t0 = pos.epoch, time.perf_counter()
        with tqdm(total=n, desc=f"epoch {epoch}/{config.train.epochs}", unit="img",
                  disable=None if progress is None else not progress, leave=False) as bar:
            try:
                train_means = train_epoch(model, optimizer, images, config, bar, pos, generator,
                                          after_step, ctx, loss, on_step if callbacks else None, update)
            except NonFiniteError as e:
                kept = rundir.state_paths(run_dir)
                where = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved yet"
                raise BdvaeError(f"{e}; training stopped and {where}; to skip such batches instead, set "
                                 f"skip_nonfinite = true under [train] in {run_dir / rundir.CONFIG_FILE} "
                                 "and run bdvae train --resume") from None
        skipped = train_means.pop("skipped_batches")
        if skipped:
            log(f"epoch {epoch}: skipped {skipped} batches with a non-finite loss or gradient")
        test_means = evaluate_terms(model, data.test_images, config, seed=config.train.seed, ctx=ctx)
        batches = math.ceil(n / (config.train.batch_size * ctx.world_size))
        diverged = (f"{skipped} of its {batches} batches had a non-finite loss or gradient, more than "
                    f"train.max_skipped_share = {config.train.max_skipped_share:g}"
                    if skipped > config.train.max_skipped_share * batches else
                    f"its test loss is {test_means['loss']}" if not math.isfinite(test_means["loss"]) else None)
        if diverged:  # before the epoch's training state: the last good one stays the newest
            kept = rundir.state_paths(run_dir)
            where = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved yet"
            raise BdvaeError(f"epoch {epoch}: the run diverged: {diverged}; training stopped and {where}; "
                             "a smaller train.lr or objective.beta, say, trains anew")
        row = {"epoch": epoch, "skipped_batches": skipped, **{f"train_{k}": v for k, v in train_means.items()},
               **{f"test_{k}": v for k, v in test_means.items()}, "seconds": time.perf_counter() - t0}
        pos.rows.append(row)
        pos.epoch, pos.next_start, pos.order = epoch + 1, 0, None
        if ctx.is_main:
            # Before the epoch's training state: a run resumed from an earlier one logs the epoch again.
            view = tracking.EpochView(model, data.test_images, config, pos.global_step, run_dir)
            tracking.call(callbacks, "on_epoch_end", epoch, dict(row), view)
            tracking.call(callbacks, "on_checkpoint", pos.global_step)
            rundir.write_metrics_log(run_dir, pos.rows)
            pictures.save_loss_curves(pos.rows, run_dir / rundir.LOSS_CURVE)
            rundir.save_training_state(run_dir, model, optimizer, pos, generator)  # the epoch's end, its row included
        aggregate = f", aggregate {row['test_aggregate']:.4f}" if "test_aggregate" in row else ""
        log(f"epoch {epoch}: train loss {row['train_loss']:.2f} (recon {row['train_recon_nll']:.2f}, "
            f"reg {row['train_reg']:.2f}); test loss {row['test_loss']:.2f} (recon {row['test_recon_nll']:.2f}, "
            f"KL {row['test_kl']:.2f}, BD {row['test_bhattacharyya']:.2f}{aggregate}); {row['seconds']:.1f} s")

    if ctx.is_main:
        model.cpu()
        rundir.save_run(run_dir, model, config, {
            "image_shape": list(data.shape), "data_source": data.source, "epochs": config.train.epochs,
            "train_images": n, "test_images": len(data.test_images), "processes": ctx.world_size,
            "device": ctx.device.type, "precision": "bf16 autocast" if mixed_precision else "fp32",
            "step": "host" if update is None else f"device, {update.how}",
            "seconds": round(sum(r["seconds"] for r in pos.rows), 1)})
        pictures.save_run_pictures(model, to_float(data.test_images[:pictures.PICTURE_COUNT]),
                                   run_dir / rundir.ORIGINALS, run_dir / rundir.RECONSTRUCTIONS,
                                   run_dir / rundir.SAMPLES, seed=config.train.seed)
        tracking.call(callbacks, "on_train_end", run_dir, [dict(r) for r in pos.rows])
    return run_dir
