"""Benchmark of the latent samplers on a trained run: fit time on the run's training latents, and
throughput of drawing z, of drawing decoded images, and of scoring latents (ln p(z)). Prints a
table, writes JSON. The fits are written to a scratch folder, never into the run.

    python benchmarks/samplers.py RUN_DIR [--samplers gmm-10,two_stage] [--json benchmarks/samplers.json]

Not part of the test suite: on the default run (60,000 latents) and 2 CPU cores it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bdvae.api import load_run
from bdvae.data import load_dataset
from bdvae.likelihoods import LIKELIHOODS
from bdvae.rundir import fit_sampler
from bdvae.samplers import Prior, parse_name
from performance import machine  # benchmarks/ is on the path of a script run from it

DRAWS = 10000


def timed(fn, repeats: int = 3) -> float:
    """The best of `repeats` wall times of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--samplers", default="gmm-10,two_stage")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/samplers.json"))
    args = parser.parse_args()

    run = load_run(args.run)
    data = load_dataset(run.config.data, log=lambda _: None)
    binarize = LIKELIHOODS[run.config.objective.likelihood].binarize
    test_z = run.encode(data.test_images[:DRAWS])[0]  # latents to score: the test posterior means
    host = machine()
    results: dict[str, object] = {"run": str(args.run), "latents": len(data.train_images), "draws": DRAWS,
                                  "machine": host, "samplers": {}}
    print(f"{host['cpu']} (bf16 units: {', '.join(host.get('bf16_units', [])) or 'none'}), {host['threads']} threads; "
          f"{len(data.train_images)} training latents")
    print(f"{'sampler':<12} {'fit s':>7} {'z draws/s':>11} {'images/s':>9} {'ln p(z)/s':>10}")
    scratch = Path(tempfile.mkdtemp(prefix="bdvae-bench-"))
    try:
        for name in ["prior", *args.samplers.split(",")]:
            options = parse_name(name)
            fit_seconds = 0.0
            if options.kind == "prior":
                sampler = Prior(run.config.model.latent_dim)
            else:
                t0 = time.perf_counter()
                sampler = fit_sampler(scratch, run.model, binarize, data.train_images, options, log=lambda _: None)
                fit_seconds = time.perf_counter() - t0
            gen = torch.Generator().manual_seed(0)
            z_seconds = timed(lambda: sampler.sample(DRAWS, gen))
            # Best of 2: a first call pays one-off costs (a sampler's first float64 linear algebra, say).
            image_seconds = timed(lambda: run.decode(sampler.sample(DRAWS, gen)), repeats=2)
            density_seconds = timed(lambda: sampler.log_density(test_z, gen), repeats=2)
            row = {"fit_seconds": round(fit_seconds, 1), "z_per_second": round(DRAWS / z_seconds),
                   "images_per_second": round(DRAWS / image_seconds), "log_density_per_second": round(DRAWS / density_seconds)}
            results["samplers"][options.name] = row  # type: ignore[index]
            print(f"{options.name:<12} {row['fit_seconds']:>7.1f} {row['z_per_second']:>11,} "
                  f"{row['images_per_second']:>9,} {row['log_density_per_second']:>10,}")
    finally:
        shutil.rmtree(scratch)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
