"""Training throughput with 1 and 2 data-parallel processes (`bdvae train --nproc N`), and on a
CUDA GPU with and without mixed precision when there is one. The process counts alternate, round
by round, so that the ratios hold on a noisy machine; each round is one real `bdvae train` of one
epoch, timed by the run's own `seconds` in metrics.jsonl (start-up and the final writes excluded).

    python benchmarks/distributed.py [--rounds 2] [--images 12000] [--json benchmarks/distributed.json]

On a 2-core CPU, 2 processes get one core each: the same arithmetic on the same cores, so the
best they can do is match 1 process with 2 threads. Not part of the test suite (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def train_once(out: Path, nproc: int, batch: int, images: int, device: str, extra: list[str]) -> float:
    """Images per second of one epoch of `bdvae train` with `nproc` processes of `batch` images each."""
    cmd = [sys.executable, "-m", "bdvae", "train", "--nproc", str(nproc), "--device", device, "--out", str(out),
           "--quiet", "--set", f"data.train_size={images}", "--set", "data.test_size=1000",
           "--set", "train.epochs=1", "--set", f"train.batch_size={batch}", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return images / row["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/distributed.json"))
    args = parser.parse_args()

    # (name, processes, per-process batch, device, extra --set): 2 x 64 keeps the global batch of 1 x 128.
    setups = [("1 process, batch 128", 1, 128, "cpu", []),
              ("2 processes x 64 (global 128)", 2, 64, "cpu", []),
              ("2 processes x 128 (global 256)", 2, 128, "cpu", [])]
    if torch.cuda.is_available():
        setups += [("1 GPU, fp32, batch 128", 1, 128, "cuda", ["--set", "train.mixed_precision=false"]),
                   ("1 GPU, bf16 autocast, batch 128", 1, 128, "cuda", [])]
    rates: dict[str, list[float]] = {name: [] for name, *_ in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, nproc, batch, device, extra) in enumerate(setups):
                rates[name].append(train_once(Path(tmp) / f"r{r}-{i}", nproc, batch, args.images, device, extra))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    base = medians[setups[0][0]]
    print(f"{'setup':<34} {'median img/s':>12} {'vs 1 process':>12}   rounds")
    for name, values in rates.items():
        print(f"{name:<34} {medians[name]:>12.0f} {medians[name] / base:>11.2f}x   " + ", ".join(f"{v:.0f}" for v in values))
    print(f"{os.cpu_count()} CPU cores; {args.images} images, 1 epoch per round; torch {torch.__version__}")
    args.json.write_text(json.dumps({"rates": rates, "medians": medians, "cpu_count": os.cpu_count(),
                                     "images": args.images, "cuda": torch.cuda.is_available()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
