"""How the time of a training epoch grows with the training set and with the model, so that users
can predict their own runs: one epoch of the real `bdvae.train` per row, timed by the run's own
`seconds` (the epoch and its test-set pass, 1,000 test images), default config otherwise.

    python benchmarks/growth.py [--json benchmarks/growth.json]

Not part of the test suite (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bdvae.config import Config, DataConfig, ModelConfig, TrainConfig
from bdvae.distributed import Context
from bdvae.model import build_model
from bdvae.training import train

SIZES = (1000, 5000, 15000, 60000)
MODELS = {  # name -> (widths, latent_dim), at 15,000 images
    "widths 16-32-64, D=16": ((16, 32, 64), 16),
    "widths 32-64-128, D=16 (reference)": ((32, 64, 128), 16),
    "widths 64-128-256, D=16": ((64, 128, 256), 16),
    "widths 32-64-128, D=4": ((32, 64, 128), 4),
    "widths 32-64-128, D=64": ((32, 64, 128), 64),
}
MODEL_IMAGES = 15000


def epoch_seconds(config: Config, folder: Path) -> float:
    train(config, folder, progress=False, log=lambda _: None)
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/growth.json"))
    args = parser.parse_args()
    one_epoch = TrainConfig(epochs=1, checkpoint_every=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in SIZES:
            config = Config(data=DataConfig(train_size=n, test_size=1000), train=one_epoch)
            seconds = epoch_seconds(config, Path(tmp) / f"n{n}")
            rows.append({"what": f"{n} images, reference model", "images": n, "seconds": seconds})
        for name, (widths, latent_dim) in MODELS.items():
            model = ModelConfig(arch="conv", widths=widths, latent_dim=latent_dim)
            config = Config(data=DataConfig(train_size=MODEL_IMAGES, test_size=1000), model=model, train=one_epoch)
            params = sum(p.numel() for p in build_model(model, config.objective, (1, 32, 32)).parameters())
            seconds = epoch_seconds(config, Path(tmp) / name.replace(" ", "_"))
            rows.append({"what": f"{MODEL_IMAGES} images, {name}", "images": MODEL_IMAGES, "parameters": params,
                         "seconds": seconds})
    precision = "bf16 autocast" if Context().bf16_autocast(Config().train.mixed_precision) else "fp32"
    print(f"{'one epoch of':<48} {'seconds':>8} {'img/s':>7} {'60k-image epoch':>16}")
    for row in rows:
        rate = row["images"] / row["seconds"]
        print(f"{row['what']:<48} {row['seconds']:>8.1f} {rate:>7.0f} {60000 / rate:>14.1f} s")
    print(f"batch 128, {torch.get_num_threads()} threads, {precision}; seconds include a 1,000-image test pass")
    args.json.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(), "precision": precision},
                                    indent=2) + "\n")


if __name__ == "__main__":
    main()
