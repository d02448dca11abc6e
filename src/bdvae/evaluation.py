"""`bdvae evaluate RUN`: does the regularizer do its job? Numbers on the whole test set.

Writes RUN/metrics.json and RUN/eval/*.png, returns the metrics as a dict. Every number is per
test image (nats) unless its name says otherwise; the prior is N(0, I) for every model, so the
numbers compare across regularizers. docs/evaluation.md#what-each-figure-means says what each one
means.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdvae import logs, metrics, pictures, rundir
from bdvae._version import __version__
from bdvae.classifier import classifier_facts, features_and_logits, load_classifier, score_samples
from bdvae.data import Dataset, load_dataset
from bdvae.devices import available_memory, check_memory, fast_bf16, keep_freed_memory, resolve_device
from bdvae.errors import BdvaeError, first_line
from bdvae.likelihoods import LIKELIHOODS, to_float
from bdvae.kernels import iwae_decoder
from bdvae.model import activation_bytes
from bdvae.objective import image_terms, regularizer
from bdvae.options import MIN_IMAGES, EvalOptions  # torch-free: the command line declares a flag per field
from bdvae.rundir import TrainedRun
from bdvae.samplers import Sampler

BATCH = 1000  # test images per forward pass (no gradient is kept)
IWAE_IMAGES_PER_STEP = 100  # images per IWAE step: the progress bar's unit of work
IWAE_SAVE_SECONDS = 60.0  # how often an evaluation saves its IWAE's progress (rundir.save_iwae_progress)
# Latents per IWAE decode at most on a CPU, whatever --max-batch allows: with a few hundred the
# decoder's activations stay in the CPU's caches (docs/results/performance.md#intel-xeon-with-amx-the-levers).
# A GPU decodes --max-batch latents at once, by default as many as GPU_DECODE_SHARE of its free memory holds.
IWAE_DECODE_BATCH = 256
GPU_DECODE_SHARE = 4  # a quarter


def mean_and_error(v: Tensor) -> dict[str, float]:
    """The mean of per-image values and its standard error."""
    v = v.double()
    return {"mean": v.mean().item(), "std_error": (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else 0.0}


def batched(fn: Callable[[Tensor], Any], x: Tensor, batch: int = BATCH) -> Any:
    """fn(x) computed `batch` rows at a time, so that memory does not grow with x: a tensor, or a
    tuple of tensors, concatenated."""
    if len(x) <= batch:
        return fn(x)
    parts = [fn(x[i: i + batch]) for i in range(0, len(x), batch)]
    return torch.cat(parts) if isinstance(parts[0], Tensor) else tuple(map(torch.cat, zip(*parts)))


@torch.inference_mode()
def _check_finite(run: TrainedRun, what: str, values: Tensor, rows: str = "test images") -> None:
    """One line, rather than statistics of NaN or a linear-algebra traceback, when a model with
    finite weights computes non-finite values (weights large enough to overflow, say)."""
    bad = ~torch.isfinite(values.flatten(1) if values.dim() > 1 else values)
    if bad.any():
        count = bad.reshape(len(values), -1).any(1).sum().item()
        raise BdvaeError(f"{run.path}: {what} are not finite for {count} of {len(values)} {rows}, although the "
                         "weights are: the model overflows, and evaluate's statistics need finite values")


def _statistic(run: TrainedRun, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), a statistic of the evaluation; one line naming it if its linear algebra fails (a
    covariance too ill-conditioned to decompose)."""
    try:
        return fn(*args)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as e:
        raise BdvaeError(f"{run.path}: {what} cannot be computed: {first_line(e)}") from None


@torch.inference_mode()
def reconstruction_and_divergences(run: TrainedRun, x: Tensor, intensities: Tensor, gen: torch.Generator) -> dict[str, Any]:
    """Single-sample reconstruction NLL (the training objective's, objective.image_terms), MSE of
    the decoded posterior mean, KL and BD per image. Without a graph: its tensors live through the
    whole evaluation, and the autograd graph of the test set's forward passes would live with them."""
    model, objective = run.model, run.config.objective
    eps = torch.randn(len(x), run.config.model.latent_dim, generator=gen)  # (N, D)
    batches = [image_terms(model, x[i: i + BATCH], objective, eps[i: i + BATCH]) for i in range(0, len(x), BATCH)]
    recon_nll, mu, logvar, z = (torch.cat([getattr(t, name) for t in batches])
                                for name in ("recon_nll", "mu", "logvar", "z"))
    rows = torch.arange(len(x))  # batched by row index, so the term reads its own tensors
    mse = batched(lambda i: (model.decode_mean(mu[i]) - intensities[i]).square().flatten(1).mean(1), rows)
    kl, bd = regularizer(objective, "kl"), regularizer(objective, "bhattacharyya")

    def per_dim_mean(fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:  # (D,): both are sums over dimensions
        return torch.stack([fn(mu[:, j: j + 1], logvar[:, j: j + 1]).mean() for j in range(mu.shape[1])])

    return {"mu": mu, "logvar": logvar, "z": z, "recon_nll": recon_nll, "mse": mse,
            "kl": kl(mu, logvar), "bd": bd(mu, logvar), "kl_per_dim": per_dim_mean(kl), "bd_per_dim": per_dim_mean(bd)}


def iwae_dtype(options: EvalOptions, device: torch.device = torch.device("cpu")) -> str:
    """options.dtype with "auto" resolved for `device`."""
    if options.dtype != "auto":
        return options.dtype
    return "bf16" if fast_bf16(device) else "fp32"


def iwae_decode_batch(options: EvalOptions, device: torch.device, decoder: nn.Module, latent_dim: int) -> int:
    """Latents per IWAE decode of `decoder` on `device`: options.max_batch (at most IWAE_DECODE_BATCH on
    a CPU); unset, IWAE_DECODE_BATCH on a CPU, and on a GPU the power of 2 of latents whose fp32
    activations fill at most 1 / GPU_DECODE_SHARE of its free memory, no more than a step's images
    times k and no fewer than IWAE_DECODE_BATCH (a power of 2, so that an unfinished pass, whose
    setting holds it, is taken up after the free memory moved a little)."""
    if device.type == "cpu":
        return min(options.max_batch or IWAE_DECODE_BATCH, IWAE_DECODE_BATCH)
    if options.max_batch is not None:
        return options.max_batch
    free = available_memory(device)
    if free is None:
        return IWAE_DECODE_BATCH
    where = next(decoder.parameters()).device  # a CPU model, or its copy on the GPU
    fits = free // GPU_DECODE_SHARE // activation_bytes(decoder, torch.zeros(1, latent_dim, device=where))
    return max(IWAE_DECODE_BATCH, 1 << (min(fits, IWAE_IMAGES_PER_STEP * options.k).bit_length() - 1))


def iwae_nll(run: TrainedRun, x: Tensor, options: EvalOptions, gen: torch.Generator, progress: bool | None,
             device: torch.device = torch.device("cpu"), done: Tensor | None = None,
             save: Callable[[Tensor, Tensor], None] | None = None) -> Tensor:
    """-ln p(x) per image by the IWAE bound with options.k samples, computed on `device` (a copy
    of the model goes there; the noise is drawn by `gen` on the CPU, so devices see the same
    samples); (N,) on the CPU.

    A pass can be taken up where it stopped: `done` holds the first images' -ln p(x) and `gen` the
    state it had after them, so every image gets the noise of one uninterrupted pass. `save(nll so
    far, generator state after them)` is called every IWAE_SAVE_SECONDS and on Ctrl-C."""
    model = run.model if device.type == "cpu" else copy.deepcopy(run.model).to(device)
    if device.type == "cpu":
        keep_freed_memory()  # each decode's activations from the heap, not fresh pages (docs/results/performance.md)
    nll = LIKELIHOODS[run.config.objective.likelihood].nll
    decoder = iwae_decoder(model)
    bf16 = iwae_dtype(options, device) == "bf16"
    max_batch = iwae_decode_batch(options, device, model.decoder, run.config.model.latent_dim)

    def log_px_given_z(z: Tensor, xs: Tensor) -> Tensor:
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            x_logits = decoder(z)
        return -nll(x_logits.float(), xs, model.log_sigma)  # the sum over pixels in fp32

    # (-ln p(x) of a step's images, the generator's state after them), appended in one call: a
    # Ctrl-C lands between steps, never between a step's figures and its state.
    steps = [] if done is None else [(done, gen.get_state())]
    before = 0 if done is None else len(done)
    saved = time.monotonic()

    def so_far() -> tuple[Tensor, Tensor]:
        return torch.cat([figures for figures, _ in steps]), steps[-1][1]

    with tqdm(total=len(x), initial=before, desc=f"IWAE, K={options.k}", unit="img",
              disable=None if progress is None else not progress, leave=False) as bar:
        try:
            for i in range(before, len(x), IWAE_IMAGES_PER_STEP):
                chunk = x[i: i + IWAE_IMAGES_PER_STEP]
                steps.append((-metrics.iwae_log_likelihood(model.encode, log_px_given_z, chunk.to(device), options.k,
                                                           max_batch=max_batch, generator=gen).cpu(), gen.get_state()))
                bar.update(len(chunk))
                if save is not None and time.monotonic() - saved >= IWAE_SAVE_SECONDS and i + len(chunk) < len(x):
                    save(*so_far())
                    saved = time.monotonic()
        except KeyboardInterrupt:
            if save is not None and steps:
                save(*so_far())
            raise
    return so_far()[0]


def decoded_samples(run: TrainedRun, sampler: Sampler, n: int, seed: int) -> Tensor:
    """n images decoded from the sampler's draws, the same for the same seed. For the prior these
    are the decoded z ~ N(0, I) that earlier versions scored (torch.randn with the seed)."""
    z = sampler.sample(n, torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return batched(run.model.decode_mean, z)


def has_reference_classifier(run: TrainedRun, data: Dataset) -> bool:
    """Whether the reference classifier scores this run's samples: 32x32 MNIST only."""
    return run.config.data.name == "mnist" and tuple(data.shape) == (1, 32, 32)


def sampler_scores(run: TrainedRun, data: Dataset, intensities: Tensor, test_z: Tensor, samplers: dict[str, Sampler],
                   options: EvalOptions, pictures_to: Path | None) -> dict[str, dict[str, Any]]:
    """Per sampler: the sample-quality scores of options.samples decoded draws against the test
    images (None where the reference classifier does not apply), the mean log density of the
    test latents `test_z` (one z ~ q(z|x) per test image, never seen by a fit) under it, and the
    ratio of the prior's Fréchet distance to its own; its first 64 samples as a picture in the run
    directory `pictures_to`, if given."""
    classifier = load_classifier() if has_reference_classifier(run, data) else None
    real = features_and_logits(classifier, intensities) if classifier is not None else None
    out: dict[str, dict[str, Any]] = {}
    n = options.samples if classifier is not None else 64  # without scores, only the picture's
    for name, sampler in samplers.items():
        images = decoded_samples(run, sampler, n, options.seed + 1)
        _check_finite(run, f"the images decoded from {name}'s draws", images, rows="samples")
        quality = None
        if classifier is not None:
            quality = {"samples": options.samples, **_statistic(run, f"the sample quality of {name}", score_samples,
                                                                classifier, real, images),
                       "classifier": classifier_facts()}
        density = sampler.log_density(test_z, torch.Generator().manual_seed(options.seed + 3))
        out[name] = {"sample_quality": quality, "test_latent_log_density": mean_and_error(density),
                     "fit": None if name == "prior" else rundir.read_facts(run.path, name)}
        if pictures_to is not None:
            path = pictures_to / rundir.samples_picture(name)
            path.parent.mkdir(exist_ok=True)
            pictures.save_grid(images[:64], path)
    prior_fd = (out["prior"]["sample_quality"] or {}).get("frechet_distance")
    for entry in out.values():
        fd = (entry["sample_quality"] or {}).get("frechet_distance")
        entry["frechet_ratio"] = prior_fd / fd if prior_fd is not None and fd else None
    return out


def write_pictures(run: TrainedRun, x: Tensor, labels: Tensor, terms: dict[str, Any]) -> list[str]:
    """Latent histograms, the 2-D view of the means, an interpolation grid and a traversal grid,
    into the run directory; returns them, relative to it."""
    folder = run.path
    (folder / rundir.EVAL_DIR).mkdir(exist_ok=True)
    mu = terms["mu"]
    pictures.save_latent_histograms(terms["z"], folder / rundir.LATENT_HISTOGRAMS)
    pictures.save_latent_scatter(mu, labels, folder / rundir.LATENT_MEANS)
    pictures.save_interpolation(run.model, x, mu, folder / rundir.INTERPOLATION)
    pictures.save_traversal(run.model, mu[0], folder / rundir.TRAVERSAL)
    return [rundir.LATENT_HISTOGRAMS, rundir.LATENT_MEANS, rundir.INTERPOLATION, rundir.TRAVERSAL]


def _check_sizes(run: TrainedRun, n: int, options: EvalOptions, device: torch.device) -> None:
    """Refuse in one line, before anything is computed, an evaluation whose decodes cannot fit: the
    IWAE's batch of latents and its running sums (which grow with k) on `device`, and the decoded
    samples scored on the CPU."""
    d = run.config.model.latent_dim
    decode_batch = iwae_decode_batch(options, device, run.model.decoder, d)
    images = min(IWAE_IMAGES_PER_STEP, n, decode_batch)  # as metrics.iwae_log_likelihood splits them
    decodes = math.ceil(options.k / max(1, min(options.k, decode_batch // images)))
    per_latent = activation_bytes(run.model.decoder, torch.zeros(1, d)) // 2  # halved: bf16 may decode
    check_memory(decode_batch * per_latent + 4 * decodes * images, f"the IWAE with k={options.k:,} and a decode batch "
                 f"of {decode_batch:,}", device, "use a smaller -k or --max-batch", python_fix="use a smaller k or max_batch")
    check_memory(4 * options.samples * (d + math.prod(run.image_shape)), f"scoring {options.samples:,} samples",
                 torch.device("cpu"), "use fewer --samples", python_fix="use fewer samples")


def evaluate_run(run_dir: Path, options: EvalOptions = EvalOptions(), progress: bool | None = None,
                 log: Callable[[str], None] = logs.info, device: str = "auto") -> dict[str, Any]:
    """Evaluate a finished run; write RUN/metrics.json (and RUN/eval/*.png) and return the metrics.
    The IWAE, most of the time, runs on `device` ("auto": a CUDA GPU when there is one, "cpu" or
    "cuda"); the rest, seconds on a CPU, stays there."""
    started = time.perf_counter()
    where = resolve_device(device)  # a bad --device fails before the run is even read
    run = rundir.load(run_dir)
    objective = run.config.objective
    data_cfg = dataclasses.replace(run.config.data, test_size=options.test_size)
    data = load_dataset(data_cfg, log=log)
    if tuple(data.shape) != run.image_shape:
        raise BdvaeError(f"{run_dir}: the data now gives images of shape {tuple(data.shape)}, "
                         f"the run was trained on {run.image_shape}")
    if len(data.test_images) < MIN_IMAGES:
        raise BdvaeError(f"{run_dir}: evaluation needs at least {MIN_IMAGES} test images, the data has {len(data.test_images)}")
    _check_sizes(run, len(data.test_images), options, where)
    likelihood = LIKELIHOODS[objective.likelihood]
    # Before the IWAE's minutes: a damaged or mismatched sampler file fails here, in one line.
    samplers = rundir.ensure_samplers(run.path, run.model, likelihood.binarize, data.train_images, options.samplers,
                               run.config.model.latent_dim, log)
    intensities = to_float(data.test_images)
    gen = torch.Generator().manual_seed(options.seed)
    x = likelihood.targets(intensities, gen)
    n = len(x)

    terms = reconstruction_and_divergences(run, x, intensities, gen)
    for name, what in (("mu", "the posterior means"), ("logvar", "the posterior log-variances"),
                       ("recon_nll", "the reconstruction NLLs")):
        _check_finite(run, what, terms[name])  # before the IWAE's minutes
    dtype = iwae_dtype(options, where)
    # An unfinished IWAE of this very setting (the evaluation was stopped) is taken up, not redone.
    setting = {"k": options.k, "seed": options.seed, "images": n, "dtype": dtype,
               "device": where.type, "decode_batch": iwae_decode_batch(options, where, run.model.decoder,
                                                                       run.config.model.latent_dim),
               "weights": rundir.weights_digest(run.path)}
    done = None
    if (found := rundir.load_iwae_progress(run.path, setting, log)) is not None:
        done, state = found
        gen.set_state(state)
        log(f"IWAE: taking up an unfinished pass after {len(done)} of {n} test images")
    resumed_after = 0 if done is None else len(done)
    t0 = time.perf_counter()
    nll = iwae_nll(run, x, options, gen, progress, where, done,
                   save=lambda so_far, state: rundir.save_iwae_progress(run.path, setting, so_far, state))
    iwae_seconds = time.perf_counter() - t0
    neg_elbo = terms["recon_nll"] + terms["kl"]

    result: dict[str, Any] = {
        "run": str(run_dir),
        "bdvae_version": __version__,  # the evaluating version, and when (UTC), for reports
        "evaluated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "regularizer": objective.regularizer,
        "beta": objective.beta,
        "likelihood": objective.likelihood,
        "likelihood_note": likelihood.note,
        "test_images": n,
        "options": dataclasses.asdict(options),
        "reconstruction": {"nll": mean_and_error(terms["recon_nll"]), "mse_per_pixel": mean_and_error(terms["mse"])},
        "divergences": {
            "kl": mean_and_error(terms["kl"]), "bhattacharyya": mean_and_error(terms["bd"]),
            "kl_per_dim": terms["kl_per_dim"].tolist(), "bhattacharyya_per_dim": terms["bd_per_dim"].tolist(),
            "kl_dim_mean": terms["kl_per_dim"].mean().item(), "bhattacharyya_dim_mean": terms["bd_per_dim"].mean().item(),
        },
        "neg_elbo": mean_and_error(neg_elbo),
        "iwae_nll": {**mean_and_error(nll), "k": options.k, "dtype": dtype,
                     "device": where.type,
                     "importance_samples_per_second": (n - resumed_after) * options.k / iwae_seconds,
                     "resumed_after_images": resumed_after},
        "prior_match": _statistic(run, "the prior match", metrics.prior_match, terms["z"], terms["mu"], terms["logvar"],
                                  torch.Generator().manual_seed(options.seed + 2)),
    }
    pictures_to = run.path if options.pictures else None
    result["samplers"] = sampler_scores(run, data, intensities, terms["z"], samplers, options, pictures_to)
    result["sample_quality"] = result["samplers"]["prior"]["sample_quality"]  # as before samplers came
    if options.pictures:
        result["pictures"] = sorted([*map(rundir.samples_picture, samplers),
                                     *write_pictures(run, intensities, data.test_labels, terms)])
    result["seconds"] = round(time.perf_counter() - started, 1)
    rundir.remove_other_pictures(run.path, keep=result.get("pictures", []))
    rundir.write_metrics(run.path, result)
    rundir.clear_iwae_progress(run.path)
    return result
