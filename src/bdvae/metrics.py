"""Estimators behind `bdvae evaluate`: pure functions of tensors, each tested where the answer is known.

- iwae_log_likelihood: the importance-weighted bound on ln p(x) (Burda et al. 2015).
- prior_match: how close the aggregate posterior q(z) is to N(0, I) (moments, covariance, MMD).
- frechet_distance, inception_score, precision_recall: sample quality in a feature space.
- FIGURES: what bdvae reports of an evaluation, the one declared table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

_LN_2PI = math.log(2.0 * math.pi)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """ln N(z | 0, I) summed over the last axis."""
    return -0.5 * (z.square() + _LN_2PI).sum(-1)


@torch.inference_mode()
def iwae_log_likelihood(encode: Callable[[Tensor], tuple[Tensor, Tensor]],
                        log_px_given_z: Callable[[Tensor, Tensor], Tensor],
                        x: Tensor, k: int, max_batch: int = 4096,
                        generator: torch.Generator | None = None) -> Tensor:
    """The IWAE estimate of ln p(x) for each image of x (B, ...): (B,) in nats.

        ln p(x) >= E[ ln (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x) ],   z_k ~ q(z|x) = N(mu, diag e^logvar)

    K = 1 is the ELBO; the bound tightens as K grows (Burda et al. 2015, theorem 1). The prior is
    N(0, I) whatever regularizer trained the model, so runs are comparable. The K samples are taken
    in chunks so that at most `max_batch` latents are decoded at once: memory does not grow with K.
    `log_px_given_z(z, x)` takes z (M, D) and x (M, ...) and returns ln p(x|z) (M,).
    """
    if len(x) > max_batch:  # more images than one decode may hold: split the images first
        return torch.cat([iwae_log_likelihood(encode, log_px_given_z, x[i: i + max_batch], k, max_batch, generator)
                          for i in range(0, len(x), max_batch)])
    mu, logvar = encode(x)  # (B, D) each
    b, d = mu.shape
    std = torch.exp(0.5 * logvar)
    chunk = max(1, min(k, max_batch // b))  # samples per decode: chunk * B <= max_batch latents
    partial = []  # logsumexp over each chunk of samples, (B,) each
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        # One (B, D) draw per sample, from the (CPU) generator whatever the device: the draws then
        # do not depend on how the K samples are chunked (torch's CPU sampler fills a call in blocks
        # of 16 numbers, so calls of other sizes draw other numbers), and a GPU, which decodes more
        # samples at once, sees the same ones. Where B * D fills whole blocks, one call draws those
        # numbers, without a call per sample.
        eps = (torch.randn(n, b, d, generator=generator, dtype=mu.dtype) if b * d % 16 == 0
               else torch.stack([torch.randn(b, d, generator=generator, dtype=mu.dtype) for _ in range(n)]))
        eps = eps.to(mu.device)  # (n, B, D)
        z = mu + std * eps
        log_q = -0.5 * (eps.square() + logvar + _LN_2PI).sum(-1)  # (n, B): ln q(z|x), with z - mu = std * eps
        log_p = standard_normal_log_density(z)  # (n, B)
        xs = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
        log_lik = log_px_given_z(z.reshape(n * b, d), xs).reshape(n, b)
        partial.append(torch.logsumexp(log_lik + log_p - log_q, dim=0))
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


def moments(z: Tensor) -> dict[str, list[float]]:
    """Per-dimension mean, variance, skewness and excess kurtosis of samples z (N, D)."""
    z = z.double()
    mean = z.mean(0)
    centred = z - mean
    var = centred.square().mean(0)
    skew = centred.pow(3).mean(0) / var.pow(1.5)
    kurt = centred.pow(4).mean(0) / var.square() - 3.0
    return {"mean": mean.tolist(), "variance": var.tolist(), "skewness": skew.tolist(), "excess_kurtosis": kurt.tolist()}


def mmd2_tensor(x: Tensor, y: Tensor, scales: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)) -> Tensor:
    """Unbiased squared MMD between samples x (N, D) and y (M, D) with a sum of inverse multiquadric
    kernels k(a, b) = C / (C + |a - b|²), C = 2 D * scale (Tolstikhin et al. 2018, as in WAE): heavy
    tails keep it sensitive to both a shifted mean and a wrong spread. 0 in expectation iff x ~ y.
    A 0-dim float64 tensor, differentiable in x and y (the training objective's aggregate term)."""
    x, y = x.double(), y.double()
    d = x.shape[1]

    def kernel_sum(a: Tensor, b: Tensor) -> Tensor:
        # |a - b|² expanded, as cdist would, but with a gradient that stays finite where a = b.
        sq = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)
        return sum(2 * d * s / (2 * d * s + sq) for s in scales)

    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel_sum(x, x), kernel_sum(y, y), kernel_sum(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))  # off-diagonal terms: unbiased
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2 * kxy.mean()


def mmd2(x: Tensor, y: Tensor) -> float:
    """mmd2_tensor(x, y) as a number."""
    return mmd2_tensor(x, y).item()


# Of S in gaussian_bd, float64: a covariance collapsed to a point stays finite, and so does its gradient.
EIGENVALUE_FLOOR = 1e-12


def mixture_moments(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """The mean m (D,) and covariance S (D, D) of the mixture (1/B) Σ_i N(mu_i, diag e^logvar_i), in
    float64: m = mean_i mu_i, S = Cov_i(mu_i) (over B, not B - 1) + mean_i diag(e^logvar_i)."""
    mu, var = mu.double(), logvar.double().exp()
    m = mu.mean(0)
    centred = mu - m
    return m, centred.T @ centred / len(mu) + torch.diag(var.mean(0))


def gaussian_bd(m: Tensor, s: Tensor) -> Tensor:
    """The Bhattacharyya distance between N(m, S) and N(0, I) (Bhattacharyya 1943):

        BD = ⅛ mᵀ A⁻¹ m + ½ ln(det A / √(det S · det I)),   A = (S + I) / 2

    in float64. A's eigenvalues are at least ½, so mᵀA⁻¹m and ln det A come from its Cholesky
    factor. Only ln det S is delicate: it is the sum of the logarithms of S's eigenvalues, floored
    at EIGENVALUE_FLOOR, which keeps the value and its gradient finite for a near-singular S. (The
    eigenvalues alone: their gradient V diag(g) Vᵀ is defined also where they repeat, as they do for
    a collapsed batch, where the eigenvectors' is not.)"""
    m, s = m.double(), s.double()
    a = (s + torch.eye(len(s), dtype=s.dtype, device=s.device)) / 2
    chol = torch.linalg.cholesky(a)
    solved = torch.cholesky_solve(m.unsqueeze(1), chol).squeeze(1)
    log_det_a = 2 * chol.diagonal().log().sum()
    log_det_s = torch.linalg.eigvalsh(s).clamp(min=EIGENVALUE_FLOOR).log().sum()
    return (m @ solved) / 8 + 0.5 * log_det_a - 0.25 * log_det_s


def prior_match(z: Tensor, mu: Tensor, logvar: Tensor, generator: torch.Generator,
                mmd_samples: int = 2000) -> dict[str, object]:
    """How far the aggregate posterior q(z) = mean_x q(z|x) is from N(0, I).

    z (N, D): one draw from q(z|x) per test image, so z ~ q(z); mu, logvar (N, D): the posterior
    parameters. `aggregate_bhattacharyya`: the BD of q(z)'s moment-matched Gaussian to N(0, I),
    exact in mu and logvar (gaussian_bd; the `bhattacharyya` aggregate term of the objective).
    Active units: dimensions with Cov_x(E_q[z]) > 0.01 (Burda et al. 2015). The MMD uses the
    first `mmd_samples` draws against as many N(0, I) draws; `mmd2_null` is the same statistic
    between two N(0, I) samples of that size, the scale of pure sampling noise.
    """
    zd = z.double()
    cov = torch.cov(zd.T).reshape(zd.shape[1], zd.shape[1])
    eig = torch.linalg.eigvalsh(cov)
    n = min(mmd_samples, len(z))
    d = z.shape[1]
    prior = torch.randn(3 * n, d, generator=generator, dtype=torch.float64)
    return {
        "mean_norm": zd.mean(0).norm().item(),
        "cov_eigenvalue_min": eig[0].item(),
        "cov_eigenvalue_max": eig[-1].item(),
        "per_dim": moments(z),
        "mmd2": mmd2(zd[:n], prior[:n]),
        "mmd2_null": mmd2(prior[n: 2 * n], prior[2 * n:]),
        "mmd_samples": n,
        "aggregate_bhattacharyya": gaussian_bd(*mixture_moments(mu, logvar)).item(),
        "active_units": int((mu.double().var(0) > 0.01).sum().item()),
        "posterior_mean_variance": mu.double().var(0).tolist(),
    }


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, F) and b (M, F) (Heusel et al. 2017):

        |m_a - m_b|² + tr(S_a + S_b - 2 (S_a^½ S_b S_a^½)^½)

    The matrix square roots come from symmetric eigendecompositions in float64, so the result is
    real and never negative (scipy's sqrtm of the non-symmetric S_a S_b can return complex noise).
    """
    a64, b64 = a.double().numpy(), b.double().numpy()
    ma, mb = a64.mean(0), b64.mean(0)
    sa, sb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(np.square(ma - mb).sum() + np.trace(sa) + np.trace(sb) - 2 * trace_root)


def inception_score(logits: Tensor) -> float:
    """exp E_x KL(p(y|x) || p(y)) (Salimans et al. 2016) with the MNIST classifier: between 1 and
    the number of classes (10), high when each sample is one clear digit and all digits appear."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(log_p))
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)
    return math.exp(kl.mean().item())


def class_histogram(logits: Tensor, classes: int = 10) -> tuple[list[int], float]:
    """Counts of the predicted class, and the entropy of their frequencies in nats (ln 10 = 2.303 at most)."""
    counts = torch.bincount(logits.argmax(1), minlength=classes)
    p = counts.double() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return counts.tolist(), entropy


def _kth_neighbour_radius(feats: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row to its k-th nearest other row (N,)."""
    radii = []
    for start in range(0, len(feats), chunk):
        dist = torch.cdist(feats[start: start + chunk], feats)
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(radii)


def _covered(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """For each point, whether it lies in at least one ball (centre, radius)."""
    inside = []
    for start in range(0, len(points), chunk):
        dist = torch.cdist(points[start: start + chunk], centres)
        inside.append((dist <= radii[None]).any(1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the real (fake) manifold is the
    union of balls around each real (fake) feature reaching its k-th nearest neighbour; precision is
    the share of fake features inside the real manifold, recall the share of real inside the fake one."""
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_neighbour_radius(real, k, chunk), chunk).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k, chunk), chunk).double().mean().item()
    return precision, recall


# ---------------------------------------------------------------------------------------------
# What bdvae reports of an evaluation: the one table from which `bdvae evaluate`'s terminal table,
# the comparison report's columns and compare's check that a metrics.json is complete all derive.
# A figure added here is shown everywhere, and every metrics.json without it is computed again.


@dataclass(frozen=True)
class Figure:
    """A figure of metrics.json that bdvae reports."""

    path: tuple[str, ...]  # its keys in metrics.json; under metrics["samplers"][NAME] for a sampler's
    decimals: int | None  # None: a text, shown as it is
    column: str | None = None  # its column in the comparison report
    # Its row in `bdvae evaluate`'s table: a label formatted with the metrics (str.format_map), so
    # that it can name the options it was computed with.
    row: str | None = None
    scope: str = "run"  # "run": the run's; "sampler": each sampler's; "both": the prior's at the top and each sampler's
    row_decimals: int | None = None  # the terminal's, where it shows more than the report (default: decimals)
    better: str = ""  # "↓": lower is better, "↑": higher is better, "": neither (the report marks the best of each column that has one)
    unit: str = ""  # what the report's column header gives as its unit
    theme: str = ""  # the report's table of the run's figures that holds its column (reporting.THEMES)
    # Added after metrics.json files were published: where one lacks it, it is shown as absent, not
    # computed again (missing_figures skips it).
    optional: bool = False


_SAMPLE_QUALITY = (
    Figure(("sample_quality", "frechet_distance"), 1, "Fréchet", "Fréchet distance", "both", row_decimals=2,
           better="↓", unit="classifier features", theme="sample quality"),
    Figure(("sample_quality", "classifier_score"), 2, "classifier score", "classifier score (max 10)", "both",
           better="↑", unit="1 to 10", theme="sample quality"),
    Figure(("sample_quality", "class_entropy"), 3, "class entropy", "class entropy (max 2.303)", "both",
           better="↑", unit="nats, max 2.303", theme="sample quality"),
    Figure(("sample_quality", "precision"), 3, "precision", "precision (k=3)", "both",
           better="↑", unit="share, k = 3", theme="sample quality"),
    Figure(("sample_quality", "recall"), 3, "recall", "recall (k=3)", "both",
           better="↑", unit="share, k = 3", theme="sample quality"),
)
FIGURES: tuple[Figure, ...] = (
    Figure(("test_images",), 0, row="test images"),
    Figure(("reconstruction", "nll", "mean"), 2, "recon NLL", "reconstruction NLL (nats)",
           better="↓", unit="nats", theme="likelihood"),
    Figure(("reconstruction", "mse_per_pixel", "mean"), 4, "MSE", "reconstruction MSE per pixel", row_decimals=5,
           better="↓", unit="per pixel", theme="likelihood"),
    Figure(("divergences", "kl", "mean"), 2, "KL", "KL(q(z|x) || N(0,I)) (nats)", unit="nats", theme="likelihood"),
    Figure(("divergences", "kl_dim_mean"), 3, row="  per latent dimension"),
    Figure(("divergences", "bhattacharyya", "mean"), 2, "BD", "BD(q(z|x), N(0,I)) (nats)", unit="nats", theme="likelihood"),
    Figure(("divergences", "bhattacharyya_dim_mean"), 3, row="  per latent dimension"),
    Figure(("neg_elbo", "mean"), 2, "−ELBO", "negative ELBO (nats)", better="↓", unit="nats", theme="likelihood"),
    Figure(("iwae_nll", "mean"), 2, "IWAE −ln p(x)",
           "-ln p(x), IWAE K={iwae_nll[k]}, decoder in {iwae_nll[dtype]} on {iwae_nll[device]} (nats)",
           better="↓", unit="nats", theme="likelihood"),
    Figure(("likelihood_note",), None, row="  note"),
    Figure(("prior_match", "mean_norm"), 3, "‖mean q(z)‖", "aggregate posterior: |mean|", better="↓", theme="prior match"),
    Figure(("prior_match", "cov_eigenvalue_min"), 3, "cov eig min", "  smallest covariance eigenvalue",
           unit="N(0, I): 1", theme="prior match"),
    Figure(("prior_match", "cov_eigenvalue_max"), 3, "cov eig max", "  largest covariance eigenvalue",
           unit="N(0, I): 1", theme="prior match"),
    Figure(("prior_match", "mmd2"), 4, "MMD² to N(0,I)", "  MMD² to N(0,I)", row_decimals=5, better="↓", theme="prior match"),
    Figure(("prior_match", "mmd2_null"), 4, row="  MMD² of two N(0,I) samples (the null)", row_decimals=5),
    Figure(("prior_match", "aggregate_bhattacharyya"), 3, "aggregate BD", "  BD of its moment-matched Gaussian to N(0,I) (nats)",
           better="↓", unit="nats", theme="prior match", optional=True),
    Figure(("prior_match", "active_units"), 0, "active units", "  active units", unit="dimensions", theme="prior match"),
    *_SAMPLE_QUALITY,
    Figure(("test_latent_log_density", "mean"), 2, "test-latent ln p(z)", "test-latent ln p(z)", "sampler",
           better="↑", unit="nats"),
    Figure(("frechet_ratio",), 2, "Fréchet prior / this", "Fréchet prior / this", "sampler", better="↑", unit="×"),
)


def figure_value(metrics: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` in a metrics dict; KeyError if a key is missing, None if a value on the
    way is None (a figure that does not apply, as sample quality without the reference classifier)."""
    value = metrics
    for key in path:
        if value is None:
            return None
        if not isinstance(value, dict) or key not in value:
            raise KeyError("/".join(path))
        value = value[key]
    return value


def missing_figures(metrics: Any) -> list[str]:
    """The figures of FIGURES a metrics dict lacks (every sampler's too): what makes an older
    metrics.json incomplete."""
    samplers = metrics.get("samplers")
    if not isinstance(samplers, dict):
        return ["samplers"]
    missing = []
    places = [("run", metrics)] + [("sampler", m) for m in samplers.values()]
    for scope, where in places:
        for figure in FIGURES:
            if figure.scope in (scope, "both") and not figure.optional:
                try:
                    figure_value(where, figure.path)
                except KeyError as e:
                    missing.append(str(e.args[0]))
    return missing
