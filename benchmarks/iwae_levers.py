"""Issue 15's fp32 levers of the IWAE (`bdvae evaluate`'s likelihood), on a CPU without native bf16.

The IWAE decodes K latents per test image with a copy of the decoder (`kernels.iwae_decoder`); each
variant scores the same 40 binary images with K = 1000 and the same draws, through the real
`metrics.iwae_log_likelihood` in 256-latent decodes as `bdvae evaluate` runs it on a CPU:

- the image layer (a transposed convolution to 1 channel) as tap sums, one GEMM to the 16 kernel
  taps and 4 phase sums of shifted tap planes (`kernels.TapSumConvTranspose2d`, bdvae's now), against
  its sub-pixel form, a 3x3 convolution to 4 channels and a pixel shuffle (bdvae's before); both
  equal the plain layer in float64 (`tests/test_evaluate.py`); the two take turns in one process,
  the order alternating from round to round, and each round's ratio is taken;
- malloc keeping freed memory (`devices.keep_freed_memory`, which `bdvae evaluate` now calls
  before its IWAE on a CPU), against glibc's default heap: process-wide, so in fresh processes
  taking turns (`--heap-rounds`), each with bdvae's decoder.

The model is the reference model from seed 0: the levers' speed does not depend on the weights.

    python benchmarks/iwae_levers.py [--rounds 8] [--json benchmarks/iwae-levers.json]

Not part of the test suite (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bdvae import metrics
from bdvae.config import Config
from bdvae.devices import keep_freed_memory
from bdvae.likelihoods import bernoulli_nll
from bdvae.kernels import TapSumConvTranspose2d, iwae_decoder
from bdvae.model import build_model
from performance import machine  # benchmarks/ is on the path of a script run from it

IMAGES, K, DECODE = 40, 1000, 256


def scorer(tap_sums: bool) -> Callable[[], float]:
    """A function timing one IWAE pass over the images: importance samples per second."""
    config = Config()
    torch.manual_seed(0)
    model = build_model(config.model, config.objective, (1, 32, 32)).eval()
    decoder = iwae_decoder(model)
    if not tap_sums:
        decoder[-1] = decoder[-1].subpixel
    assert isinstance(decoder[-1], TapSumConvTranspose2d) == tap_sums
    x = (torch.rand(IMAGES, 1, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.3).float()

    def log_px_given_z(z: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return -bernoulli_nll(decoder(z), xs, model.log_sigma)

    def timed() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            metrics.iwae_log_likelihood(model.encode, log_px_given_z, x, K, max_batch=DECODE,
                                        generator=torch.Generator().manual_seed(1))
            return IMAGES * K / (time.perf_counter() - t0)
    return timed


def heap_child(keep: bool) -> None:
    """Internal: one timed IWAE pass with bdvae's decoder in this fresh process, after one untimed
    pass; prints samples/s and the minor page faults per decode."""
    if keep:
        keep_freed_memory()
    timed = scorer(tap_sums=True)
    timed()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rate = timed()
    decodes = IMAGES * K / (DECODE // IMAGES * IMAGES)
    print(rate, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / decodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--heap-rounds", type=int, default=4, help="rounds of the heap A/B, 2 processes each")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/iwae-levers.json"))
    parser.add_argument("--heap-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.heap_child:
        return heap_child(args.keep)

    heap: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.heap_rounds):
        for name, flag in (("glibc default", []), ("kept (bdvae)", ["--keep"])):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--heap-child", *flag]
            rate, faults = map(float, subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split())
            heap.setdefault(name, {"samples_per_second": [], "faults_per_decode": []})
            heap[name]["samples_per_second"].append(rate)
            heap[name]["faults_per_decode"].append(faults)

    keep_freed_memory()  # as bdvae evaluate does
    variants = {"image layer: sub-pixel (before)": scorer(tap_sums=False), "image layer: tap sums (bdvae)": scorer(tap_sums=True)}
    for timed in variants.values():
        timed()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(variants[name]())
    base = rates[names[0]]
    ratios = {name: statistics.median(v / b for v, b in zip(values, base)) for name, values in rates.items()}
    print(f"{'variant':<40} {'median samples/s':>16} {'ratio':>7}   rounds")
    for name, values in rates.items():
        print(f"{name:<40} {statistics.median(values):>16.0f} {ratios[name]:>6.3f}x   " + ", ".join(f"{v:.0f}" for v in values))
    base_heap = heap["glibc default"]["samples_per_second"]
    for name, figures in heap.items():
        ratio = statistics.median(r / b for r, b in zip(figures["samples_per_second"], base_heap))
        figures["ratio_to_glibc_default"] = ratio
        print(f"heap {name:<35} {statistics.median(figures['samples_per_second']):>16.0f} {ratio:>6.3f}x   "
              f"{statistics.median(figures['faults_per_decode']):.0f} page faults a decode "
              f"({args.heap_rounds} alternating processes)")
    print(f"reference model, K = {K}, {IMAGES} images, {DECODE}-latent decodes, fp32, {torch.get_num_threads()} threads")
    args.json.write_text(json.dumps({"machine": machine(), "k": K, "images": IMAGES, "rounds": args.rounds,
                                     "rates": rates, "ratio_to_sub_pixel": ratios, "heap": heap}, indent=2) + "\n")


if __name__ == "__main__":
    main()
