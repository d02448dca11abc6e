"""GroupNorm on a CPU, in the layout bdvae computes in (channels-last): torch's own nn.GroupNorm
against kernels.ContiguousGroupNorm, which normalises a channels-last bf16 input in the usual
layout. The quality preset's model with `model.norm = "group"`: training (batch 128, bdvae's loss,
Adam) and the IWAE's decoder copy (256 latents a decode), in bf16 autocast and in fp32. The
variants take turns, window by window, so that their ratios hold on a noisy machine.

    python benchmarks/group_norm.py [--rounds 3] [--steps 10] [--json benchmarks/group-norm.json]

Not part of the test suite (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import bdvae
from bdvae.config import load
from bdvae.kernels import ContiguousGroupNorm, iwae_decoder
from bdvae.model import build_model
from levers import window as training_window  # benchmarks/levers.py and performance.py, beside this script
from performance import machine

LATENTS = 256  # per IWAE decode: the CPU's decode batch (evaluation.IWAE_DECODE_BATCH)


def with_plain_group_norm(model: nn.Module) -> nn.Module:
    """`model` with each ContiguousGroupNorm replaced by torch's nn.GroupNorm, the same weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ContiguousGroupNorm):
            plain = nn.GroupNorm(module.num_groups, module.num_channels, module.eps)
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return model


@torch.inference_mode()
def decode_window(decoder, z, bf16: bool, steps: int) -> float:
    """Latents per second of `steps` decodes of z."""
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            decoder(z)
    return steps * len(z) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/group-norm.json"))
    args = parser.parse_args()

    config = load(preset="quality", overrides=["model.norm=group"])
    shape = (1, 32, 32)
    x = torch.rand(128, *shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    z = torch.randn(LATENTS, config.model.latent_dim, generator=torch.Generator().manual_seed(1))
    windows = {}  # (part, precision, norm) -> a window's rate
    for bf16 in (True, False):
        for norm in ("torch's nn.GroupNorm", "ContiguousGroupNorm (bdvae)"):
            torch.manual_seed(0)
            model = build_model(config.model, config.objective, shape)
            if norm.startswith("torch"):
                model = with_plain_group_norm(model)
            model = model.to(memory_format=torch.channels_last)
            optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
            decoder = iwae_decoder(model.eval())  # channels-last, as evaluate's
            model.train()
            precision = "bf16" if bf16 else "fp32"
            windows[("train img/s", precision, norm)] = (
                lambda m=model, o=optimizer, b=bf16: training_window(m, o, x, config, b, args.steps))
            windows[("IWAE decode latents/s", precision, norm)] = (
                lambda d=decoder, b=bf16: decode_window(d, z, b, 4 * args.steps))
    for run in windows.values():
        run()  # warm-up
    rates: dict[tuple, list[float]] = {key: [] for key in windows}
    for _ in range(args.rounds):
        for key, run in windows.items():
            rates[key].append(run())
    medians = {key: statistics.median(v) for key, v in rates.items()}
    print(f"{'part':<22} {'precision':<9} {'GroupNorm':<28} {'median':>8} {'vs torch':>8}   rounds")
    for (part, precision, norm), values in sorted(rates.items(), key=lambda kv: kv[0][:2]):
        base = medians[(part, precision, "torch's nn.GroupNorm")]
        print(f"{part:<22} {precision:<9} {norm:<28} {medians[(part, precision, norm)]:>8.0f} "
              f"{medians[(part, precision, norm)] / base:>7.2f}x   " + ", ".join(f"{v:.0f}" for v in values))
    facts = machine()
    where = f"{facts['cpu']} (bf16 units: {', '.join(facts['bf16_units']) or 'none'}), {facts['threads']} threads, torch {facts['torch']}"
    print(f"quality preset with model.norm=group, batch 128, {LATENTS} latents a decode; {where}")
    args.json.write_text(json.dumps({
        "rates": [{"part": p, "precision": q, "norm": n, "rates": v, "median": medians[(p, q, n)]}
                  for (p, q, n), v in rates.items()],
        "steps": args.steps, "machine": facts, "bdvae": bdvae.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
