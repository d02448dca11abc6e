"""Each estimator where the answer is known: a linear-Gaussian model for IWAE, Gaussian samples for
MMD and the Fréchet distance, constructed logits and features for the sample-quality scores."""

from __future__ import annotations

import math

import pytest
import torch

from bdvae import metrics

X_DIM, Z_DIM, SIGMA = 5, 2, 0.5


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(W z + b, σ² I): ln p(x) = ln N(x | b, W Wᵀ + σ² I) in closed form,
    and the exact posterior is Gaussian, N(Σ Wᵀ (x - b) / σ², Σ) with Σ = (I + WᵀW / σ²)⁻¹."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(X_DIM, Z_DIM, generator=gen, dtype=torch.float64)
        self.b = torch.randn(X_DIM, generator=gen, dtype=torch.float64)
        self.post_cov = torch.linalg.inv(torch.eye(Z_DIM, dtype=torch.float64) + self.w.T @ self.w / SIGMA**2)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.w @ self.w.T + SIGMA**2 * torch.eye(X_DIM, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def log_px_given_z(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(z @ self.w.T + self.b, SIGMA).log_prob(x).sum(-1)

    def encoder(self, mean_scale: float = 1.0, logvar_shift: float = 0.0, exact_cov: bool = False):
        """A diagonal Gaussian encoder: the exact posterior's mean (scaled) and diagonal variance (shifted)."""
        def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mu = (x - self.b) @ (self.post_cov @ self.w.T / SIGMA**2).T * mean_scale
            logvar = self.post_cov.diagonal().log().expand_as(mu) + logvar_shift
            return mu, logvar
        return encode

    def samples(self, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        z = torch.randn(n, self.w.shape[1], generator=gen, dtype=torch.float64)
        return z @ self.w.T + self.b + SIGMA * torch.randn(n, X_DIM, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def lg() -> LinearGaussian:
    return LinearGaussian()


def test_iwae_approaches_the_true_marginal_from_below_as_k_grows(lg):
    x = lg.samples(40)
    truth = lg.log_marginal(x)
    encode = lg.encoder(mean_scale=0.8, logvar_shift=0.7)  # a deliberately imperfect q(z|x)
    gaps = {}
    for k in (1, 10, 100, 2000):
        gen = torch.Generator().manual_seed(k)
        estimates = torch.stack([metrics.iwae_log_likelihood(encode, lg.log_px_given_z, x, k, generator=gen)
                                 for _ in range(5)])
        gaps[k] = (truth - estimates).mean().item()  # averaged over images and repeats: the expected gap
    assert gaps[1] > gaps[10] > gaps[100] > gaps[2000] > -0.01, gaps
    assert gaps[2000] < 0.05 * gaps[1], gaps


def test_iwae_is_exact_with_the_exact_posterior_whatever_the_chunking(lg):
    """With the exact posterior every weight p(x, z) / q(z|x) equals p(x). The posterior covariance
    of this model is not diagonal, so use one latent dimension where it is exact."""
    w = lg.w[:, :1]
    one = LinearGaussian()
    one.w, one.post_cov = w, torch.linalg.inv(torch.eye(1, dtype=torch.float64) + w.T @ w / SIGMA**2)
    x = one.samples(30)
    for max_batch in (7, 4096):  # 7: images split and one sample per decode; 4096: one chunk
        estimate = metrics.iwae_log_likelihood(one.encoder(), one.log_px_given_z, x, k=50, max_batch=max_batch)
        torch.testing.assert_close(estimate, one.log_marginal(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("b, d", [(30, 16), (7, 16), (30, 5)])  # whole blocks of 16 numbers drawn at once, or not
def test_iwae_draws_one_b_by_d_block_per_sample_from_the_generator(b, d):
    """Each sample's noise is the generator's next (B, D) draw, however K is chunked: the figures
    of an evaluation do not depend on the decode batch or the device."""
    seen = []

    def encode(x):  # the prior as posterior: z is the noise itself
        return torch.zeros(len(x), d), torch.zeros(len(x), d)

    def log_px_given_z(z, xs):
        seen.append(z)
        return torch.zeros(len(z))

    for max_batch in (b, 4 * b):  # one sample per decode, then four
        seen.clear()
        metrics.iwae_log_likelihood(encode, log_px_given_z, torch.zeros(b, 1), k=9, max_batch=max_batch,
                                    generator=torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        expected = torch.stack([torch.randn(b, d, generator=gen) for _ in range(9)])
        assert torch.cat(seen).reshape(9, b, d).equal(expected)


def test_iwae_chunked_and_whole_agree_within_sampling_noise(lg):
    x = lg.samples(20)
    encode = lg.encoder(mean_scale=0.8, logvar_shift=0.7)
    whole = metrics.iwae_log_likelihood(encode, lg.log_px_given_z, x, k=3000, generator=torch.Generator().manual_seed(0))
    chunked = metrics.iwae_log_likelihood(encode, lg.log_px_given_z, x, k=3000, max_batch=64,
                                          generator=torch.Generator().manual_seed(1))
    assert (whole - chunked).abs().max() < 0.3  # each within its sampling noise (sd ~0.05 here)
    assert abs((whole - chunked).mean()) < 0.03  # and no bias between them


def _normal(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_mmd_is_near_its_null_for_the_prior_and_clearly_above_for_shifted_or_scaled():
    n, d = 1000, 8
    null = [metrics.mmd2(_normal(n, d, s), _normal(n, d, 100 + s)) for s in range(5)]
    spread = max(abs(v) for v in null)
    assert spread < 2e-3  # sampling noise only: unbiased, so it straddles 0
    assert metrics.mmd2(_normal(n, d, 7, shift=0.3), _normal(n, d, 8)) > 10 * spread
    assert metrics.mmd2(_normal(n, d, 7, scale=1.3), _normal(n, d, 8)) > 10 * spread
    assert metrics.mmd2(_normal(n, d, 7, scale=0.7), _normal(n, d, 8)) > 10 * spread


def test_prior_match_of_prior_samples():
    z = _normal(20000, 4, 0).float()
    mu = torch.cat([_normal(20000, 2, 1) * 0.5, _normal(20000, 2, 2) * 0.05], 1).float()  # variances .25 and .0025
    result = metrics.prior_match(z, mu, torch.full_like(mu, -20.0), torch.Generator().manual_seed(3))
    assert result["mean_norm"] < 0.05
    assert 0.95 < result["cov_eigenvalue_min"] <= result["cov_eigenvalue_max"] < 1.05
    assert all(abs(v - 1) < 0.05 for v in result["per_dim"]["variance"])
    assert all(abs(v) < 0.1 for v in result["per_dim"]["skewness"] + result["per_dim"]["excess_kurtosis"])
    assert result["active_units"] == 2
    assert abs(result["mmd2"]) < 5 * abs(result["mmd2_null"]) + 1e-3


def test_moments_of_a_skewed_distribution():
    """Exponential(1): skewness 2, excess kurtosis 6."""
    z = torch.distributions.Exponential(1.0).sample((400000, 1)).double()
    m = metrics.moments(z)
    assert m["skewness"][0] == pytest.approx(2.0, abs=0.1)
    assert m["excess_kurtosis"][0] == pytest.approx(6.0, abs=1.0)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_matches_the_gaussian_formula():
    a = _normal(5000, 6, 0)
    assert abs(metrics.frechet_distance(a, a)) < 1e-8
    b = _normal(5000, 6, 1, shift=1.0, scale=2.0)
    # N(0, I) against N(1, 4 I) in 6 dimensions: |m|² + tr(I + 4I - 2·2I) = 6 + 6
    assert metrics.frechet_distance(a, b) == pytest.approx(12.0, rel=0.05)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-6)


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(100, 1) * 50  # each class equally often, with certainty
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert metrics.inception_score(torch.zeros(1000, 10)) == pytest.approx(1.0)  # no idea: uniform
    one_class = torch.zeros(1000, 10)
    one_class[:, 3] = 50
    assert metrics.inception_score(one_class) == pytest.approx(1.0)


def test_class_histogram_and_entropy():
    logits = torch.eye(10)[torch.tensor([0, 0, 1, 1])]
    counts, entropy = metrics.class_histogram(logits)
    assert counts == [2, 2] + [0] * 8
    assert entropy == pytest.approx(math.log(2))


def test_precision_recall_of_equal_disjoint_and_collapsed_sets():
    real = _normal(600, 5, 0).float()
    assert metrics.precision_recall(real, real.clone(), chunk=128) == (1.0, 1.0)
    far = real + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(600, 1) + 1e-3 * _normal(600, 5, 1).float()  # every sample the same point
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05  # realistic, but covers almost nothing
