"""Wall time of `bdvae compare` running its configurations one at a time and N at a time
(`--jobs N`), on the same small plan; the two take turns, round by round, so that the ratio holds
on a noisy machine. Each round is a fresh `--out`: every run is trained and evaluated.

    python benchmarks/compare_jobs.py [--jobs 2] [--rounds 2] [--json benchmarks/compare_jobs.json]

On a 2-core CPU, N = 2 jobs get one core each against one job with both cores: the same
arithmetic, so what --jobs can win here is what one process leaves idle (start-up, data loading,
pictures, the serial parts of the evaluation). Not part of the test suite (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from performance import machine  # benchmarks/ is on the path of a script run from it

# 2 regularizers x 2 seeds = 4 runs of one epoch on 6,000 images, each evaluated on 1,000 test images.
PLAN = ["--regularizers", "bhattacharyya,kl", "--seeds", "2", "--epochs", "1", "--set", "data.train_size=6000",
        "-k", "20", "--samples", "1000", "--test-size", "1000", "--quiet"]


def compare_seconds(out: Path, jobs: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bdvae", "compare", "--out", str(out), "--jobs", str(jobs), *PLAN],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/compare_jobs.json"))
    args = parser.parse_args()
    if args.jobs < 2:
        parser.error("--jobs: at least 2, to compare with 1")

    seconds: dict[int, list[float]] = {1: [], args.jobs: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for jobs in seconds:
                seconds[jobs].append(compare_seconds(Path(tmp) / f"r{r}-jobs{jobs}", jobs))
    medians = {jobs: statistics.median(v) for jobs, v in seconds.items()}
    print(f"bdvae compare, 4 runs (1 epoch of 6,000 images, evaluated on 1,000 test images), {os.cpu_count()} CPU cores")
    print(f"{'setup':<10} {'median s':>9} {'speed-up':>9}   rounds")
    for jobs, values in seconds.items():
        print(f"--jobs {jobs:<3} {medians[jobs]:>9.1f} {medians[1] / medians[jobs]:>8.2f}x   "
              + ", ".join(f"{v:.1f}" for v in values))
    args.json.write_text(json.dumps({"machine": machine(), "seconds": seconds, "medians": medians,
                                     "cpu_count": os.cpu_count(), "plan": PLAN}, indent=2) + "\n")


if __name__ == "__main__":
    main()
