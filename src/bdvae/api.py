"""The Python API: train or resume from a config; evaluate, compare and report; load a finished run
and encode / decode / reconstruct / sample / fit a sampler / evaluate.

    import bdvae
    from bdvae.config import Config

    run_dir = bdvae.train(Config(), "runs/bd")
    run = bdvae.load_run(run_dir)
    images = run.sample(16, seed=0)          # (16, C, H, W) floats in [0, 1]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bdvae import rundir
from bdvae.comparison import compare as _compare
from bdvae.config import Config
from bdvae.data import load_dataset
from bdvae.devices import check_memory
from bdvae.errors import BdvaeError, check_seed
from bdvae.evaluation import EvalOptions, batched, evaluate_run
from bdvae.likelihoods import LIKELIHOODS
from bdvae.reporting import Entry, report as _report
from bdvae.samplers import Sampler, parse_name
from bdvae.tracking import Callback
from bdvae.training import resume as _resume, train as _train


def train(config: Config, run_dir: str | Path, overwrite: bool = False, progress: bool | None = None,
          device: str = "auto", callbacks: Sequence[Callback] = ()) -> Path:
    """Train a VAE as configured into `run_dir` and return its path; `device` is "auto" (a CUDA GPU
    when there is one), "cpu" or "cuda". `callbacks` hear of every train.log_every-th step, every
    checkpoint and epoch, and the end (bdvae.Callback; docs/python-api.md#callbacks-and-trackers).
    Under torchrun, every process calls it (docs/scaling-out.md)."""
    return _train(config, Path(run_dir), overwrite=overwrite, progress=progress, device=device, callbacks=callbacks)


def resume(run_dir: str | Path, progress: bool | None = None, device: str = "auto",
           callbacks: Sequence[Callback] = ()) -> Path:
    """Continue the interrupted run in `run_dir` from its newest good training state, to the same
    weights, bit for bit, as a run never interrupted (on the same device and number of processes);
    returns its path."""
    return _resume(Path(run_dir), progress=progress, device=device, callbacks=callbacks)


def evaluate(run_dir: str | Path, *, progress: bool | None = None, device: str = "auto", **options: Any) -> dict[str, Any]:
    """Every figure of a finished run on its test set (docs/evaluation.md); writes RUN/metrics.json
    and RUN/eval/*.png and returns the metrics as the dict metrics.json holds. `options` are
    evaluation.EvalOptions fields, the command line's flags: k, samples, test_size, seed, max_batch,
    dtype, pictures, samplers (a tuple of names, e.g. ("prior", "gmm-10"))."""
    return evaluate_run(Path(run_dir), EvalOptions(**options), progress=progress, device=device)


def compare(out: str | Path, regularizers: Sequence[str] = ("bhattacharyya", "kl"), betas: Sequence[float] = (1.0,),
            seeds: int = 3, *, base: Config | None = None, epochs: int | None = None, jobs: int = 1,
            progress: bool | None = None, device: str = "auto", **options: Any) -> list[Entry]:
    """Train and evaluate every regularizer x beta for seeds 0 .. seeds-1 on the `base` config (the
    defaults if None) into OUT/runs/, reusing finished runs, and write OUT/report.md and .html
    (docs/comparing.md); returns one reporting.Entry per run (its regularizer, beta, seed, run_dir and
    metrics). `options` are evaluation.EvalOptions fields, as for `evaluate`. One regularizer or
    beta may be given alone ("kl", 2.0)."""
    regularizers = [regularizers] if isinstance(regularizers, str) else list(regularizers)
    betas = [betas] if isinstance(betas, (int, float)) else list(betas)
    return _compare(base or Config(), regularizers, [float(b) for b in betas], seeds, Path(out), epochs=epochs,
                    options=EvalOptions(**options), progress=progress, jobs=jobs, device=device)


def report(run_dirs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """The comparison report of runs trained and evaluated apart, written into `out`; returns the
    paths of report.md and report.html. An earlier report there is replaced only with `overwrite`."""
    return _report([Path(r) for r in run_dirs], Path(out), overwrite)


def check_draw(n: int, seed: int | None) -> None:
    """A count of samples and a seed (or None), as `sample` (Run.sample and `bdvae sample`) takes them;
    else one line."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:  # numpy's integers too
        raise BdvaeError(f"-n must be positive, got {n!r}", python=f"n must be a positive integer, got {n!r}")
    if seed is not None:
        check_seed(seed, "--seed", "seed")


def _as_float(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Images (B, C, H, W), or one (C, H, W), of the run's `shape`, as floats in [0, 1]: integer
    pixels in [0, 255] are divided by 255; other input is one line."""
    if not isinstance(x, Tensor) or x.dim() not in (3, 4) or tuple(x.shape[-3:]) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise BdvaeError(f"images must be a tensor (B, {', '.join(map(str, shape))}), as the run was trained on; "
                         f"got {got}")
    low, high = (0.0, 1.0) if x.is_floating_point() else (0, 255)
    if x.numel() and not low <= x.min().item() <= x.max().item() <= high:
        raise BdvaeError(f"images must be floats in [0, 1] or integer pixels in [0, 255]; got values from "
                         f"{x.min().item():g} to {x.max().item():g}")
    x = x.float() if x.is_floating_point() else x.float().div_(255.0)
    return x.unsqueeze(0) if x.dim() == 3 else x


@dataclass(frozen=True)
class Run(rundir.TrainedRun):
    """A finished run: its directory, config, facts (run.json) and the trained model (eval mode),
    with what one does with a trained VAE."""

    @torch.inference_mode()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters (mu, logvar), each (B, D), of images x (B, C, H, W): floats in
        [0, 1] or integer pixels in [0, 255]."""
        return batched(self.model.encode, _as_float(x, self.image_shape))

    @torch.inference_mode()
    def decode(self, z: Tensor) -> Tensor:
        """Mean images (B, C, H, W) in [0, 1] for latents z (B, D)."""
        latent_dim = self.config.model.latent_dim
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != latent_dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise BdvaeError(f"latents must be a tensor (B, {latent_dim}), got {got}")
        return batched(self.model.decode_mean, z.float())

    @torch.inference_mode()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean of each image: (B, C, H, W) in [0, 1]."""
        mu, _ = self.encode(x)
        return self.decode(mu)

    @torch.inference_mode()
    def sample(self, n: int, seed: int | None = None, sampler: str = "prior") -> Tensor:
        """Decode n draws of z from `sampler`: "prior" (N(0, I)) or a sampler fitted in the run
        directory (`bdvae sampler fit`, e.g. "gmm-10"); (n, C, H, W) in [0, 1]."""
        check_draw(n, seed)
        n = int(n)
        if not isinstance(sampler, str):
            raise BdvaeError(f"sampler must be a name (\"prior\", \"gmm-10\", ...), got {sampler!r}")
        latent_dim = self.config.model.latent_dim
        check_memory(4 * n * (latent_dim + math.prod(self.image_shape)), f"drawing {n:,} samples", torch.device("cpu"),
                     "draw fewer (-n)", python_fix="draw fewer (n)")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.decode(rundir.load_sampler(self.path, sampler, self.config.model.latent_dim).sample(n, gen))

    def evaluate(self, *, progress: bool | None = None, device: str = "auto", **options: Any) -> dict[str, Any]:
        """bdvae.evaluate of this run: its metrics as a dict, also written to RUN/metrics.json."""
        return evaluate(self.path, progress=progress, device=device, **options)

    def fit_sampler(self, kind: str, *, overwrite: bool = False, **options: Any) -> Sampler:
        """Fit a latent sampler on the run's training latents, store it in RUN/samplers/ and return
        it. `kind` is a kind ("gmm") or a name ("gmm-20"); `options` are samplers.FitOptions fields
        (components, regularizer, seed, fit_on) and override what a name spells."""
        fit_options = dataclasses.replace(parse_name(kind), **options)
        data = load_dataset(self.config.data)
        binarize = LIKELIHOODS[self.config.objective.likelihood].binarize
        return rundir.fit_sampler(self.path, self.model, binarize, data.train_images, fit_options, overwrite=overwrite)


def load_run(run_dir: str | Path) -> Run:
    """The finished run in `run_dir`; one line (a BdvaeError) if it is unfinished or damaged."""
    model, config, facts = rundir.load_model(Path(run_dir))
    return Run(path=Path(run_dir), config=config, facts=facts, model=model)
