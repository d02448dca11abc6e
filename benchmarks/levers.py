"""The training levers of docs/results/performance.md, one against another: fp32 or bf16 autocast, the
usual (NCHW) or the channels-last layout, Adam's default CPU loop or its foreach form. Each
variant trains its own copy of the reference model on the same batch (batch 128, bdvae's loss,
Adam); the variants take turns, window by window, so that their ratios hold on a noisy machine.

    python benchmarks/levers.py [--rounds 3] [--steps 25] [--json benchmarks/levers.json]

Not part of the test suite (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bdvae.config import Config
from bdvae.model import build_model
from bdvae.objective import loss_terms

VARIANTS = {  # name -> (bf16 autocast, channels-last, foreach Adam)
    "fp32": (False, False, False),
    "fp32, channels-last": (False, True, False),
    "bf16": (True, False, False),
    "bf16, channels-last (bdvae's default here)": (True, True, False),
    "fp32, foreach Adam": (False, False, True),
}


def window(model, optimizer, x, config, bf16: bool, steps: int) -> float:
    """Images per second of `steps` Adam steps on the batch x."""
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_terms(model, x, config.objective).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/levers.json"))
    args = parser.parse_args()

    config = Config()
    x = torch.rand(128, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    setups = {}
    for name, (bf16, channels_last, foreach) in VARIANTS.items():
        torch.manual_seed(0)
        model = build_model(config.model, config.objective, (1, 32, 32))
        batch = x
        if channels_last:
            model, batch = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, foreach=foreach)
        window(model, optimizer, batch, config, bf16, 5)  # warm-up
        setups[name] = (model, optimizer, batch, bf16)
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (model, optimizer, batch, bf16) in setups.items():
            rates[name].append(window(model, optimizer, batch, config, bf16, args.steps))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    base = medians["fp32"]
    print(f"{'variant':<44} {'median img/s':>12} {'vs fp32':>8}   rounds")
    for name, values in rates.items():
        print(f"{name:<44} {medians[name]:>12.0f} {medians[name] / base:>7.2f}x   " + ", ".join(f"{v:.0f}" for v in values))
    print(f"reference model, batch 128, {torch.get_num_threads()} threads, {args.steps} steps per window")
    args.json.write_text(json.dumps({"rates": rates, "medians": medians, "threads": torch.get_num_threads(),
                                     "steps": args.steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
