"""Benchmark of `bdvae evaluate`: IWAE throughput, the gap of the default K to K = 5000, and the
wall time and peak memory of the whole command on a trained run. Prints a table, writes JSON.

    python benchmarks/evaluate.py RUN_DIR [--images 500] [--device auto] [--max-batch N]
                                  [--samples 10000] [--test-size N] [--json benchmarks/evaluate.json]

Not part of the test suite: on 2 CPU cores it takes about 10 minutes. On a GPU (`--device cuda`,
or auto where there is one) --max-batch sets how many latents one decode takes (each step holds
100 images, so at most 100 x K).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bdvae.api import load_run
from bdvae.config import DataConfig
from bdvae.data import load_dataset
from bdvae.devices import resolve_device
from bdvae.evaluation import iwae_dtype, iwae_nll
from bdvae.options import DEFAULT_K, EvalOptions
from bdvae.likelihoods import LIKELIHOODS
from bdvae.likelihoods import binarized, to_float


def iwae_on(run, x: torch.Tensor, options: EvalOptions, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, float]:
    """-ln p(x) per image with options.k samples on `device`, and the seconds it took."""
    t0 = time.perf_counter()
    nll = iwae_nll(run, x, options, torch.Generator().manual_seed(seed), progress=False, device=device)
    return nll, time.perf_counter() - t0  # nll is back on the CPU: the GPU has finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=500, help="test images for the K comparison")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda: where the IWAE runs")
    parser.add_argument("--max-batch", type=int, default=None, help="as bdvae evaluate --max-batch (default: its default)")
    parser.add_argument("--samples", type=int, default=EvalOptions().samples,
                        help=f"as bdvae evaluate --samples, for the timed command (default {EvalOptions().samples:,})")
    parser.add_argument("--test-size", type=int, default=None,
                        help="as bdvae evaluate --test-size, for the timed command (default: all test images)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/evaluate.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)

    run = load_run(args.run)
    data = load_dataset(DataConfig(**{**run.config.data.__dict__, "test_size": args.images}), log=lambda _: None)
    x = to_float(data.test_images)
    if LIKELIHOODS[run.config.objective.likelihood].binarize:  # as `bdvae evaluate` scores binarized models
        x = binarized(x, torch.Generator().manual_seed(0))
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results: dict[str, object] = {"run": str(args.run), "images": len(x), "threads": torch.get_num_threads(),
                                  "device": device.type, "max_batch": args.max_batch, "machine": machine}
    rows = []
    for k in (DEFAULT_K, 1000, 5000):
        options = EvalOptions(k=k, max_batch=args.max_batch)
        nll, seconds = iwae_on(run, x, options, device)
        rows.append({"k": k, "precision": iwae_dtype(options, device), "nll": nll.mean().item(),
                     "std_error": (nll.std() / len(nll) ** 0.5).item(),
                     "seconds": seconds, "importance_samples_per_second": len(x) * k / seconds})
    results["iwae"] = rows
    by_k = {r["k"]: r for r in rows}
    results["default_k_minus_k5000_nats"] = by_k[DEFAULT_K]["nll"] - by_k[5000]["nll"]

    # Peak RSS by GNU time: a child's own ru_maxrss would start from this process's size (Linux
    # keeps the high-water mark of the forked copy across exec).
    time_cmd = ["/usr/bin/time", "-f", "maxrss_kib=%M"] if Path("/usr/bin/time").is_file() else []
    t0 = time.perf_counter()
    test_size = [] if args.test_size is None else ["--test-size", str(args.test_size)]
    proc = subprocess.run([*time_cmd, sys.executable, "-m", "bdvae", "evaluate", str(args.run), "--quiet",
                           "--device", args.device, *([] if args.max_batch is None else ["--max-batch", str(args.max_batch)]),
                           "--samples", str(args.samples), *test_size],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bdvae evaluate failed: {proc.stderr.strip()}")
    found = re.search(r"maxrss_kib=(\d+)", proc.stderr)
    peak_kib = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    results["evaluate_command"] = {"k": DEFAULT_K, "samples": args.samples, "test_size": args.test_size, "wall_seconds": wall,
                                   "peak_rss_gib": peak_kib / 2**20}

    print(f"IWAE on the first {len(x)} test images of {args.run} ({results['machine']})")
    print(f"{'K':>6} {'-ln p(x)':>10} {'± s.e.':>8} {'seconds':>9} {'samples/s':>11}  precision")
    for r in rows:
        print(f"{r['k']:>6} {r['nll']:>10.3f} {r['std_error']:>8.3f} {r['seconds']:>9.1f} "
              f"{r['importance_samples_per_second']:>11.0f}  {r['precision']}")
    print(f"K={DEFAULT_K} (the default) minus K=5000: {results['default_k_minus_k5000_nats']:+.3f} nats per image")
    images = "all test images" if args.test_size is None else f"the first {args.test_size:,} test images"
    print(f"bdvae evaluate {args.run} ({images}, K={DEFAULT_K}, {args.samples:,} samples): "
          f"{wall:.0f} s wall, peak RSS {results['evaluate_command']['peak_rss_gib']:.2f} GiB")
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
