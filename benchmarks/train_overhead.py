"""What bdvae's training loop costs beyond the bare arithmetic: its own code path (progress bar,
running sums, the per-step non-finite check, training states every `checkpoint_every` steps)
against a minimal hand-written loop over the same in-memory tensors, same model, loss, optimizer
and batch size. The two alternate, window by window, so that the ratio holds on a noisy machine.

    python benchmarks/train_overhead.py [--windows 5] [--steps 200] [--checkpoint-every 200] [--json benchmarks/train_overhead.json]

Each bdvae window starts at step 0, so a window of 200 steps with a state every 200 saves exactly
one: the default config's rate.

Not part of the test suite (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bdvae.config import Config, DataConfig, TrainConfig
from bdvae.data import load_dataset
from bdvae.distributed import Context
from bdvae.model import build_model
from bdvae.objective import loss_terms
from bdvae.likelihoods import to_float
from bdvae.rundir import save_training_state
from bdvae.states import Position
from bdvae.training import train_epoch


def minimal_window(model, optimizer, images, config, steps, start) -> float:
    """`steps` plain Adam steps on consecutive batches, in the same arithmetic as bdvae's step
    (channels-last, bf16 autocast where train.mixed_precision takes effect); images per second."""
    batch = config.train.batch_size
    bf16 = Context().bf16_autocast(config.train.mixed_precision)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = slice(((start + i) * batch) % (len(images) - batch), None)
        x = to_float(images[idx][:batch]).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_terms(model, x, config.objective).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - t0)


def bdvae_window(model, optimizer, images, config, steps, run_dir) -> float:
    """`steps` steps through bdvae's own train_epoch (bar, sums, checks, checkpoints); images per second."""
    subset = images[: steps * config.train.batch_size]
    pos = Position()
    generator = torch.Generator().manual_seed(config.train.seed)
    every = config.train.checkpoint_every

    def after_step() -> None:
        if every and pos.global_step % every == 0:
            save_training_state(run_dir, model, optimizer, pos, generator)

    t0 = time.perf_counter()
    with tqdm(total=len(subset), disable=False, leave=False, mininterval=0.5) as bar:
        train_epoch(model, optimizer, subset, config, bar, pos, generator, after_step)
    return len(subset) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per timed window")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig().checkpoint_every,
                        help="steps between training states (default: the default config's)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/train_overhead.json"))
    args = parser.parse_args()

    config = Config(data=DataConfig(), train=TrainConfig(checkpoint_every=args.checkpoint_every))
    data = load_dataset(config.data, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(config.model, config.objective, data.shape).to(memory_format=torch.channels_last)  # as _fit
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    model.train()
    minimal_window(model, optimizer, data.train_images, config, 30, 0)  # warm-up
    rates: dict[str, list[float]] = {"minimal loop": [], "bdvae train_epoch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(args.windows):
            rates["minimal loop"].append(minimal_window(model, optimizer, data.train_images, config, args.steps, w * args.steps))
            rates["bdvae train_epoch"].append(bdvae_window(model, optimizer, data.train_images, config, args.steps, Path(tmp)))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    overhead = 1 - medians["bdvae train_epoch"] / medians["minimal loop"]
    print(f"{'loop':<20} {'median img/s':>12}   windows")
    for name, values in rates.items():
        print(f"{name:<20} {medians[name]:>12.0f}   " + ", ".join(f"{v:.0f}" for v in values))
    precision = "bf16 autocast" if Context().bf16_autocast(config.train.mixed_precision) else "fp32"
    print(f"bdvae's features cost {overhead:+.1%} (checkpoint every {config.train.checkpoint_every} steps, "
          f"batch {config.train.batch_size}, {torch.get_num_threads()} threads, {precision})")
    args.json.write_text(json.dumps({"rates": rates, "medians": medians, "overhead": overhead,
                                     "checkpoint_every": config.train.checkpoint_every,
                                     "threads": torch.get_num_threads(), "precision": precision}, indent=2) + "\n")


if __name__ == "__main__":
    main()
