"""`bdvae evaluate RUN`: does the regularizer do its job? Numbers on the whole test set.

Writes RUN/metrics.json and RUN/eval/*.png, returns the metrics as a dict. Every number is per
test image (nats) unless its name says otherwise; the prior is N(0, I) for every model, so the
numbers compare across regularizers. See README, "Evaluation", for what each one means.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdvae import checkpoint, metrics, pictures
from bdvae.api import Run, load_run
from bdvae.data import Dataset, load_dataset
from bdvae.distributed import native_bf16, resolve_device
from bdvae.errors import BdvaeError
from bdvae.likelihoods import LIKELIHOODS
from bdvae.model import VAE
from bdvae.objective import regularizer
from bdvae.samplers import Sampler, canonical_names, ensure_samplers, read_facts
from bdvae.train import EVAL_BATCH, binarized, to_float

METRICS_FILE = "metrics.json"
PICTURES_DIR = "eval"
DEFAULT_K = 100
IWAE_IMAGES_PER_STEP = 100  # images per IWAE step: the progress bar's unit of work
# Latents per IWAE decode at most on a CPU, whatever --max-batch allows: with a few hundred the
# decoder's activations stay in the CPU's caches (1.6x the samples/s of 1000 at once on 2 cores).
# A GPU decodes --max-batch latents at once.
IWAE_DECODE_BATCH = 256
PRECISIONS = ("auto", "fp32", "bf16")
MIN_IMAGES = 16  # the pictures use 16 test images; k-NN radii and covariances need a handful


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """What `bdvae evaluate` computes, and on how much."""

    k: int = DEFAULT_K  # importance samples per image for the IWAE estimate of -ln p(x)
    samples: int = 10000  # images decoded from N(0, I) for the sample-quality scores
    test_size: int | None = None  # evaluate on the first N test images only (default: all)
    seed: int = 0  # seed of every random draw of the evaluation (binarization, z, samples)
    max_batch: int = 1000  # most latents decoded at once: bounds memory whatever k is
    # The IWAE decoder's arithmetic: "fp32", "bf16" (bfloat16 autocast; the likelihood sums and the
    # logsumexp stay in fp32), or "auto": bf16 where the device computes it natively, else fp32. With
    # bf16 matrix units it is 2.2-2.5x faster and moves -ln p(x) by about 0.01 nat per image on
    # average (README, Performance; benchmarks/performance.py measures both).
    precision: str = "auto"
    pictures: bool = True
    # The latent samplers whose draws are scored ("prior" is N(0, I), always first); those not yet
    # fitted in the run directory are fitted first, with their default options (samplers.py).
    samplers: tuple[str, ...] = ("prior",)

    def __post_init__(self) -> None:
        for name, flag in (("k", "-k"), ("max_batch", "--max-batch")):
            value = getattr(self, name)
            if value <= 0:
                raise BdvaeError(f"{flag} must be positive, got {value}")
        for name, flag in (("samples", "--samples"), ("test_size", "--test-size")):
            value = getattr(self, name)
            if value is not None and value < MIN_IMAGES:
                raise BdvaeError(f"{flag} must be at least {MIN_IMAGES}, got {value}")
        if not 0 <= self.seed < 2**63:
            raise BdvaeError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.precision not in PRECISIONS:
            raise BdvaeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        names = (self.samplers,) if isinstance(self.samplers, str) else self.samplers
        object.__setattr__(self, "samplers", canonical_names(names))  # "gmm" -> "gmm-10", prior first


def mean_and_error(v: Tensor) -> dict[str, float]:
    """The mean of per-image values and its standard error."""
    v = v.double()
    return {"mean": v.mean().item(), "std_error": (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else 0.0}


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int = EVAL_BATCH) -> Tensor:
    return torch.cat([fn(x[i: i + batch]) for i in range(0, len(x), batch)])


def likelihood_note(likelihood: str) -> str:
    info = LIKELIHOODS[likelihood]
    if info.binarize:
        return ("dynamically binarized model: the test set is binarized once with the evaluation seed, "
                "so -ln p(x) compares with published binarized-MNIST figures (Burda et al. 2015: 86.76 nats, one-layer MLP VAE)")
    if not info.proper_density:
        return ("Bernoulli likelihood on continuous intensities: not a density of the data, so -ln p(x) is not a "
                "true negative log-likelihood; compare it only between runs with the same likelihood")
    return "Gaussian likelihood: a density of the continuous pixel values"


@torch.inference_mode()
def reconstruction_and_divergences(run: Run, x: Tensor, intensities: Tensor, gen: torch.Generator) -> dict[str, Any]:
    """Single-sample reconstruction NLL, MSE of the decoded posterior mean, KL and BD per image."""
    model, objective = run.model, run.config.objective
    nll = LIKELIHOODS[objective.likelihood].nll
    mu, logvar = (torch.cat(t) for t in zip(*(model.encode(x[i: i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH))))
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
    rows = torch.arange(len(x))  # batched by row index, so each term reads its own tensors
    recon_nll = _batched(lambda i: nll(model.decode(z[i]), x[i], model.log_sigma), rows)
    mse = _batched(lambda i: (model.decode_mean(mu[i]) - intensities[i]).square().flatten(1).mean(1), rows)
    kl, bd = regularizer(objective, "kl"), regularizer(objective, "bhattacharyya")

    def per_dim_mean(fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:  # (D,): both are sums over dimensions
        return torch.stack([fn(mu[:, j: j + 1], logvar[:, j: j + 1]).mean() for j in range(mu.shape[1])])

    return {"mu": mu, "logvar": logvar, "z": z, "recon_nll": recon_nll, "mse": mse,
            "kl": kl(mu, logvar), "bd": bd(mu, logvar), "kl_per_dim": per_dim_mean(kl), "bd_per_dim": per_dim_mean(bd)}


def has_subpixel_form(module: nn.Module) -> bool:
    """Whether `module` is a transposed convolution that subpixel_convolution can rewrite: the
    kernel 4, stride 2, padding 1 of every conv decoder here."""
    return (isinstance(module, nn.ConvTranspose2d) and module.kernel_size == (4, 4) and module.stride == (2, 2)
            and module.padding == (1, 1) and module.output_padding == (0, 0) and module.dilation == (1, 1)
            and module.groups == 1)


def subpixel_convolution(deconv: nn.ConvTranspose2d) -> nn.Sequential:
    """The same map as `deconv`, a ConvTranspose2d(kernel 4, stride 2, padding 1), as a 3x3
    convolution to 4x the channels followed by a pixel shuffle (Shi et al. 2016, "Is the
    deconvolution layer the same as a convolutional layer?").

    Output pixel (2m + a, 2n + b) of the transposed convolution sums input pixels (m + dy, n + dx)
    times kernel taps (ky, kx): for a = 0, dy = 0 with ky = 1 and dy = -1 with ky = 3; for a = 1,
    dy = 1 with ky = 0 and dy = 0 with ky = 2 (the same for columns). Each of the 4 output phases
    is thus a convolution with 4 of the 9 taps of a 3x3 window; PixelShuffle(2) interleaves the
    phases, output channel c of phase (a, b) being conv channel 4c + 2a + b.
    """
    if not has_subpixel_form(deconv):
        raise ValueError(f"subpixel_convolution handles ConvTranspose2d(k=4, s=2, p=1) only, got {deconv}")
    c_in, c_out = deconv.in_channels, deconv.out_channels
    taps = {0: ((0, 1), (-1, 3)), 1: ((1, 0), (0, 2))}  # output phase -> (input offset, kernel tap) pairs
    weight = deconv.weight.new_zeros(c_out, 2, 2, c_in, 3, 3)
    for a in (0, 1):
        for b in (0, 1):
            for dy, ky in taps[a]:
                for dx, kx in taps[b]:
                    weight[:, a, b, :, dy + 1, dx + 1] = deconv.weight[:, :, ky, kx].T
    conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1, bias=deconv.bias is not None,
                     dtype=deconv.weight.dtype, device=deconv.weight.device)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(4 * c_out, c_in, 3, 3))
        if deconv.bias is not None:
            conv.bias.copy_(deconv.bias.repeat_interleave(4))
    return nn.Sequential(conv, nn.PixelShuffle(2))


def iwae_decoder(model: VAE) -> nn.Module:
    """The model's decoder rebuilt for the IWAE's many decodes, computing the same function. A
    copy, so that the run's model is left as it was, and on 2 CPU cores:
    - in channels-last layout, where oneDNN's convolutions need no layout reorders (1.18x in fp32
      on the whole IWAE);
    - each transposed convolution to at most 4 channels (the one producing the image) in its
      sub-pixel form: oneDNN runs a deconvolution with so few output channels at a few percent of
      its speed (1.13x);
    - ReLUs in place, as no gradient is kept (1.08x in fp32).
    In fp32 the logits differ from the model's by rounding only (another summation order)."""
    decoder = copy.deepcopy(model.decoder)
    for name, module in list(decoder.named_modules()):
        if has_subpixel_form(module) and module.out_channels <= 4:
            parent, _, child = name.rpartition(".")  # (nn.Module.set_submodule needs torch 2.5)
            setattr(decoder.get_submodule(parent), child, subpixel_convolution(module))
        elif isinstance(module, nn.ReLU):
            module.inplace = True
    return decoder.to(memory_format=torch.channels_last)


def iwae_precision(options: EvalOptions, device: torch.device = torch.device("cpu")) -> str:
    """options.precision with "auto" resolved for `device`."""
    if options.precision != "auto":
        return options.precision
    return "bf16" if native_bf16(device) else "fp32"


def iwae_nll(run: Run, x: Tensor, options: EvalOptions, gen: torch.Generator, progress: bool | None,
             device: torch.device = torch.device("cpu")) -> Tensor:
    """-ln p(x) per image by the IWAE bound with options.k samples, computed on `device` (a copy
    of the model goes there; the noise is drawn by `gen` on the CPU, so devices see the same
    samples); (N,) on the CPU."""
    model = run.model if device.type == "cpu" else copy.deepcopy(run.model).to(device)
    nll = LIKELIHOODS[run.config.objective.likelihood].nll
    decoder = iwae_decoder(model)
    bf16 = iwae_precision(options, device) == "bf16"
    max_batch = min(options.max_batch, IWAE_DECODE_BATCH) if device.type == "cpu" else options.max_batch

    def log_px_given_z(z: Tensor, xs: Tensor) -> Tensor:
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            x_logits = decoder(z)
        return -nll(x_logits.float(), xs, model.log_sigma)  # the sum over pixels in fp32

    out = []
    with tqdm(total=len(x), desc=f"IWAE, K={options.k}", unit="img", disable=None if progress is None else not progress,
              leave=False) as bar:
        for i in range(0, len(x), IWAE_IMAGES_PER_STEP):
            chunk = x[i: i + IWAE_IMAGES_PER_STEP]
            out.append(-metrics.iwae_log_likelihood(model.encode, log_px_given_z, chunk.to(device), options.k,
                                                    max_batch=max_batch, generator=gen).cpu())
            bar.update(len(chunk))
    return torch.cat(out)


def score_samples(classifier: Any, real: Tensor | tuple[Tensor, Tensor], fake: Tensor) -> dict[str, Any]:
    """Sample-quality scores of images `fake` against images `real` (N, 1, 32, 32) in [0, 1],
    in the reference classifier's feature space; `real` may be given as its features_and_logits."""
    from bdvae.classifier import features_and_logits

    real_feats, _ = features_and_logits(classifier, real) if isinstance(real, Tensor) else real
    fake_feats, fake_logits = features_and_logits(classifier, fake)
    counts, entropy = metrics.class_histogram(fake_logits)
    precision, recall = metrics.precision_recall(real_feats, fake_feats, k=3)
    return {"frechet_distance": metrics.frechet_distance(real_feats, fake_feats),
            "classifier_score": metrics.inception_score(fake_logits), "class_counts": counts,
            "class_entropy": entropy, "precision": precision, "recall": recall}


def decoded_samples(run: Run, sampler: Sampler, n: int, seed: int) -> Tensor:
    """n images decoded from the sampler's draws, the same for the same seed. For the prior these
    are the decoded z ~ N(0, I) that earlier versions scored (torch.randn with the seed)."""
    z = sampler.sample(n, torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return _batched(run.model.decode_mean, z)


def has_reference_classifier(run: Run, data: Dataset) -> bool:
    """Whether the reference classifier scores this run's samples: 32x32 MNIST only."""
    return run.config.data.name == "mnist" and tuple(data.shape) == (1, 32, 32)


def sampler_scores(run: Run, data: Dataset, intensities: Tensor, test_z: Tensor, samplers: dict[str, Sampler],
                   options: EvalOptions, picture_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Per sampler: the sample-quality scores of options.samples decoded draws against the test
    images (None where the reference classifier does not apply), the mean log density of the
    test latents `test_z` (one z ~ q(z|x) per test image, never seen by a fit) under it, and the
    ratio of the prior's Fréchet distance to its own; its first 64 samples as eval/samples-NAME.png."""
    from bdvae.classifier import classifier_facts, features_and_logits, load_classifier

    classifier = load_classifier() if has_reference_classifier(run, data) else None
    real = features_and_logits(classifier, intensities) if classifier is not None else None
    out: dict[str, dict[str, Any]] = {}
    n = options.samples if classifier is not None else 64  # without scores, only the picture's
    for name, sampler in samplers.items():
        images = decoded_samples(run, sampler, n, options.seed + 1)
        quality = None
        if classifier is not None:
            quality = {"samples": options.samples, **score_samples(classifier, real, images),
                       "classifier": classifier_facts()}
        density = sampler.log_density(test_z, torch.Generator().manual_seed(options.seed + 3))
        out[name] = {"sample_quality": quality, "test_latent_log_density": mean_and_error(density),
                     "fit": None if name == "prior" else read_facts(run.path, name)}
        if picture_dir is not None:
            picture_dir.mkdir(exist_ok=True)
            pictures.save_grid(images[:64], picture_dir / f"samples-{name}.png")
    prior_fd = (out["prior"]["sample_quality"] or {}).get("frechet_distance")
    for entry in out.values():
        fd = (entry["sample_quality"] or {}).get("frechet_distance")
        entry["frechet_ratio"] = prior_fd / fd if prior_fd is not None and fd else None
    return out


def blurred(images: Tensor, sigma: float) -> Tensor:
    """Images (N, 1, H, W) convolved with a Gaussian of `sigma` pixels (zero padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = torch.nn.functional.conv2d(images, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))


def reference_scores(data: Dataset, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The sample-quality scores on reference sets, to give them a scale: as many real training
    images as there are test images (real data: what a perfect generator would score), the two
    halves of the test set against each other (fewer images and, in MNIST, different writers:
    its first 5,000 images come from other writers than its last), blurred test images, and
    uniform noise."""
    from bdvae.classifier import features_and_logits, load_classifier

    classifier = load_classifier()
    test = to_float(data.test_images)
    half = len(test) // 2
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(seed))
    real = features_and_logits(classifier, test)
    train = to_float(data.train_images[:len(test)])
    return {
        f"{len(train):,} training images": score_samples(classifier, real, train),
        "test half vs other half": score_samples(classifier, test[:half], test[half:]),
        "test blurred, sigma 1 px": score_samples(classifier, real, blurred(test, 1.0)),
        "test blurred, sigma 2 px": score_samples(classifier, real, blurred(test, 2.0)),
        "uniform noise": score_samples(classifier, real, noise),
    }


def write_pictures(run: Run, x: Tensor, labels: Tensor, terms: dict[str, Any], folder: Path) -> list[str]:
    """Latent histograms, the 2-D view of the means, an interpolation grid and a traversal grid."""
    folder.mkdir(exist_ok=True)
    mu = terms["mu"]
    pictures.save_latent_histograms(terms["z"], folder / "latent_histograms.png")
    pictures.save_latent_scatter(mu, labels, folder / "latent_means.png")
    model = run.model
    with torch.inference_mode():
        # Interpolation: 8 pairs of test images, their posterior means joined by straight lines.
        steps = torch.linspace(0, 1, 10)[None, :, None]
        a, b = mu[0:16:2, None], mu[1:16:2, None]  # (8, 1, D)
        path = (a + steps * (b - a)).reshape(-1, mu.shape[1])  # (80, D), row by row
        rows = model.decode_mean(path).reshape(8, 10, *x.shape[1:])
        grid = torch.cat([x[0:16:2, None], rows, x[1:16:2, None]], 1).reshape(-1, *x.shape[1:])
        pictures.save_grid(grid, folder / "interpolation.png", ncol=12, scale=2)
        # Traversal: each latent dimension swept over [-3, 3] with the others at the first test image's mean.
        d = mu.shape[1]
        values = torch.linspace(-3, 3, 11)
        z = mu[0].repeat(d, 11, 1)  # (D, 11, D)
        z[torch.arange(d), :, torch.arange(d)] = values
        pictures.save_grid(model.decode_mean(z.reshape(-1, d)), folder / "traversal.png", ncol=11, scale=2)
    return sorted(p.name for p in folder.glob("*.png"))


def evaluate_run(run_dir: Path, options: EvalOptions = EvalOptions(), progress: bool | None = None,
                 log: Callable[[str], None] = print, device: str = "auto") -> dict[str, Any]:
    """Evaluate a finished run; write RUN/metrics.json (and RUN/eval/*.png) and return the metrics.
    The IWAE, most of the time, runs on `device` ("auto": a CUDA GPU when there is one, "cpu" or
    "cuda"); the rest, seconds on a CPU, stays there."""
    started = time.perf_counter()
    where = resolve_device(device)  # a bad --device fails before the run is even read
    run = load_run(run_dir)
    objective = run.config.objective
    data_cfg = dataclasses.replace(run.config.data, test_size=options.test_size)
    data = load_dataset(data_cfg, log=log)
    if tuple(data.shape) != run.image_shape:
        raise BdvaeError(f"{run_dir}: the data now gives images of shape {tuple(data.shape)}, "
                         f"the run was trained on {run.image_shape}")
    if len(data.test_images) < MIN_IMAGES:
        raise BdvaeError(f"{run_dir}: evaluation needs at least {MIN_IMAGES} test images, the data has {len(data.test_images)}")
    binarize = LIKELIHOODS[objective.likelihood].binarize
    # Before the IWAE's minutes: a damaged or mismatched sampler file fails here, in one line.
    samplers = ensure_samplers(Path(run_dir), run.model, binarize, data.train_images, options.samplers,
                               run.config.model.latent_dim, log)
    intensities = to_float(data.test_images)
    gen = torch.Generator().manual_seed(options.seed)
    x = binarized(intensities, gen) if binarize else intensities
    n = len(x)

    terms = reconstruction_and_divergences(run, x, intensities, gen)
    t0 = time.perf_counter()
    nll = iwae_nll(run, x, options, gen, progress, where)
    iwae_seconds = time.perf_counter() - t0
    neg_elbo = terms["recon_nll"] + terms["kl"]

    result: dict[str, Any] = {
        "run": str(run_dir),
        "regularizer": objective.regularizer,
        "beta": objective.beta,
        "likelihood": objective.likelihood,
        "likelihood_note": likelihood_note(objective.likelihood),
        "test_images": n,
        "options": dataclasses.asdict(options),
        "reconstruction": {"nll": mean_and_error(terms["recon_nll"]), "mse_per_pixel": mean_and_error(terms["mse"])},
        "divergences": {
            "kl": mean_and_error(terms["kl"]), "bhattacharyya": mean_and_error(terms["bd"]),
            "kl_per_dim": terms["kl_per_dim"].tolist(), "bhattacharyya_per_dim": terms["bd_per_dim"].tolist(),
            "kl_dim_mean": terms["kl_per_dim"].mean().item(), "bhattacharyya_dim_mean": terms["bd_per_dim"].mean().item(),
        },
        "neg_elbo": mean_and_error(neg_elbo),
        "iwae_nll": {**mean_and_error(nll), "k": options.k, "precision": iwae_precision(options, where),
                     "device": where.type,
                     "importance_samples_per_second": n * options.k / iwae_seconds},
        "prior_match": metrics.prior_match(terms["z"], terms["mu"], torch.Generator().manual_seed(options.seed + 2)),
    }
    picture_dir = Path(run_dir) / PICTURES_DIR if options.pictures else None
    result["samplers"] = sampler_scores(run, data, intensities, terms["z"], samplers, options, picture_dir)
    result["sample_quality"] = result["samplers"]["prior"]["sample_quality"]  # as before samplers came
    if options.pictures:
        result["pictures"] = [f"{PICTURES_DIR}/{name}" for name in
                              write_pictures(run, intensities, data.test_labels, terms, Path(run_dir) / PICTURES_DIR)]
    result["seconds"] = round(time.perf_counter() - started, 1)
    checkpoint.write_text(Path(run_dir) / METRICS_FILE, json.dumps(result, indent=2) + "\n")
    return result


def format_table(m: dict[str, Any]) -> str:
    """The headline numbers of a metrics dict, one per line, for the terminal."""
    pm, sq = m["prior_match"], m["sample_quality"]
    rows = [
        ("test images", f"{m['test_images']}"),
        ("reconstruction NLL (nats)", f"{m['reconstruction']['nll']['mean']:.2f}"),
        ("reconstruction MSE per pixel", f"{m['reconstruction']['mse_per_pixel']['mean']:.5f}"),
        ("KL(q(z|x) || N(0,I)) (nats)", f"{m['divergences']['kl']['mean']:.2f}  ({m['divergences']['kl_dim_mean']:.3f} per dim)"),
        ("BD(q(z|x), N(0,I)) (nats)", f"{m['divergences']['bhattacharyya']['mean']:.2f}  "
                                      f"({m['divergences']['bhattacharyya_dim_mean']:.3f} per dim)"),
        ("negative ELBO (nats)", f"{m['neg_elbo']['mean']:.2f}"),
        (f"-ln p(x), IWAE K={m['iwae_nll']['k']}, {m['iwae_nll'].get('precision', 'fp32')} on "
         f"{m['iwae_nll'].get('device', 'cpu')} (nats)", f"{m['iwae_nll']['mean']:.2f} ± {m['iwae_nll']['std_error']:.2f}"),
        ("  note", m["likelihood_note"]),
        ("aggregate posterior: |mean|", f"{pm['mean_norm']:.3f}"),
        ("  covariance eigenvalues", f"{pm['cov_eigenvalue_min']:.3f} .. {pm['cov_eigenvalue_max']:.3f}"),
        ("  MMD² to N(0,I) (null)", f"{pm['mmd2']:.5f}  ({pm['mmd2_null']:.5f})"),
        ("  active units", f"{pm['active_units']} of {len(pm['per_dim']['mean'])}"),
    ]
    if sq is not None:
        rows += [
            ("samples: Fréchet distance", f"{sq['frechet_distance']:.2f}"),
            ("  classifier score (max 10)", f"{sq['classifier_score']:.2f}"),
            ("  class entropy (max 2.303)", f"{sq['class_entropy']:.3f}"),
            ("  precision / recall (k=3)", f"{sq['precision']:.3f} / {sq['recall']:.3f}"),
        ]
    else:
        rows.append(("samples", "no sample-quality scores: the reference classifier knows 32x32 MNIST only"))
    for name, entry in m.get("samplers", {}).items():
        density = entry["test_latent_log_density"]
        rows.append((f"sampler {name}: test-latent ln p(z)", f"{density['mean']:.2f} ± {density['std_error']:.2f}"))
        q = entry["sample_quality"]
        if q is not None and name != "prior":
            rows += [(f"  Fréchet (prior / this: {entry['frechet_ratio']:.2f}x)", f"{q['frechet_distance']:.2f}"),
                     ("  classifier score, entropy", f"{q['classifier_score']:.2f}, {q['class_entropy']:.3f}"),
                     ("  precision / recall (k=3)", f"{q['precision']:.3f} / {q['recall']:.3f}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
