"""Benchmark of candidate architectures for the quality preset: training images/s (forward,
backward and Adam step of one batch, bf16 autocast where the CPU has native bf16, as training
runs) and IWAE decodes/s (the evaluation's inner loop: the IWAE decoder on 256 latents). Random
weights and images: speed does not depend on them. Prints a table, writes JSON.

    python benchmarks/architectures.py [--json benchmarks/architectures.json]

Not part of the test suite: a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bdvae.config import ModelConfig, ObjectiveConfig
from bdvae.devices import fast_bf16
from bdvae.evaluation import IWAE_DECODE_BATCH
from bdvae.kernels import iwae_decoder
from bdvae.model import build_model
from bdvae.objective import Objective
from bdvae.steps import backward_shard
from performance import machine  # benchmarks/ is on the path of a script run from it

BATCH = 128  # train.batch_size's default
SHAPE = (1, 32, 32)
CANDIDATES = [  # (name, ModelConfig): the reference, then the residual variants tried
    ("reference", ModelConfig()),
    ("resnet 32-64-128, 1 block, 32 latents (quality)", ModelConfig(arch="resnet", latent_dim=32)),
    ("resnet 32-64-128, 2 blocks, 32 latents", ModelConfig(arch="resnet", blocks=2, latent_dim=32)),
    ("resnet 48-96-192, 1 block, 32 latents", ModelConfig(arch="resnet", widths=(48, 96, 192), latent_dim=32)),
    ("resnet 64-128-256, 1 block, 32 latents", ModelConfig(arch="resnet", widths=(64, 128, 256), latent_dim=32)),
]


def rate(step, per_call: int, seconds: float = 3.0, warmup: int = 3) -> float:
    """Items per second of step() (per_call items each), over about `seconds` after a warm-up."""
    for _ in range(warmup):
        step()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += per_call
    return n / (time.perf_counter() - t0)


def measure(model_config: ModelConfig, bf16: bool) -> dict[str, float]:
    torch.manual_seed(0)
    objective = ObjectiveConfig(likelihood="bernoulli_binarized")
    model = build_model(model_config, objective, SHAPE).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters())
    loss = Objective(model, objective)
    x = torch.bernoulli(torch.full((BATCH, *SHAPE), 0.2))
    eps = torch.randn(BATCH, model_config.latent_dim)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_shard(loss, x, eps, BATCH, 1.0, mixed_precision=bf16)
        optimizer.step()

    train_rate = rate(train_step, BATCH)
    decoder = iwae_decoder(model.eval())
    z = torch.randn(IWAE_DECODE_BATCH, model_config.latent_dim)

    def decode() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            decoder(z)

    return {"parameters": sum(p.numel() for p in model.parameters()), "train_images_per_s": round(train_rate),
            "iwae_decodes_per_s": round(rate(decode, IWAE_DECODE_BATCH))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/architectures.json"))
    args = parser.parse_args()
    bf16 = fast_bf16(torch.device("cpu"))
    host = machine()
    print(f"{host['cpu']} (bf16 units: {', '.join(host.get('bf16_units', [])) or 'none'}), {host['threads']} threads; "
          f"{'bf16 autocast' if bf16 else 'fp32'}, batch {BATCH}, {SHAPE}")
    print(f"{'architecture':<50} {'params':>9} {'train img/s':>12} {'epoch s':>8} {'IWAE dec/s':>11} {'K=5000 min':>11}")
    rows = {}
    for name, model_config in CANDIDATES:
        row = measure(model_config, bf16)
        rows[name] = {"config": {k: v for k, v in vars(model_config).items() if v is not None}, **row}
        # An epoch of the 60,000 training images, and the K = 5,000 IWAE on the 10,000 test images.
        epoch, iwae = 60000 / row["train_images_per_s"], 5000 * 10000 / row["iwae_decodes_per_s"] / 60
        print(f"{name:<50} {row['parameters']:>9,} {row['train_images_per_s']:>12} {epoch:>8.0f} "
              f"{row['iwae_decodes_per_s']:>11} {iwae:>11.0f}", flush=True)
    args.json.write_text(json.dumps({"machine": host, "precision": "bf16 autocast" if bf16 else "fp32",
                                     "batch": BATCH, "candidates": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
