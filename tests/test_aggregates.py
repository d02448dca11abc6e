"""The aggregate-posterior terms: the closed form against independent computations, the mixture's
moments against draws, finite gradients at a degenerate batch, and the term in the objective and
the test pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bdvae.aggregates import AGGREGATES, NEEDS_PRIOR_DRAWS
from bdvae.config import Config, DataConfig, ObjectiveConfig, TrainConfig
from bdvae.errors import BdvaeError
from bdvae.metrics import gaussian_bd, mixture_moments
from bdvae.regularizers import REGULARIZERS


def _random_gaussian(d: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, generator=gen, dtype=torch.float64) * scale
    root = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.5
    return m, root @ root.T + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_the_closed_form_is_the_direct_evaluation_in_float64(seed):
    """⅛ mᵀA⁻¹m + ½ ln(det A / √det S) with A = (S + I)/2, by solve and det, against the
    eigenvalue form."""
    m, s = _random_gaussian(5, seed)
    a = (s + torch.eye(5, dtype=torch.float64)) / 2
    direct = m @ torch.linalg.solve(a, m) / 8 + 0.5 * torch.log(torch.linalg.det(a) / torch.sqrt(torch.linalg.det(s)))
    assert gaussian_bd(m, s).item() == pytest.approx(direct.item(), rel=1e-10)


def test_the_closed_form_is_a_monte_carlo_estimate_of_minus_ln_the_bhattacharyya_coefficient():
    """BD = -ln E_{z~q}[sqrt(p(z) / q(z))], q = N(m, S), p = N(0, I), estimated from 400,000 draws."""
    m, s = _random_gaussian(3, 7, scale=0.7)
    q = torch.distributions.MultivariateNormal(m, s)
    p = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    torch.manual_seed(0)
    z = q.sample((400_000,))
    ratio = torch.exp(0.5 * (p.log_prob(z) - q.log_prob(z)))
    estimate = -torch.log(ratio.mean())
    error = ratio.std() / ratio.mean() / math.sqrt(len(z))  # delta method: the standard error of -ln mean
    assert abs(gaussian_bd(m, s).item() - estimate.item()) < 4 * error.item()


def test_a_diagonal_gaussian_is_the_sum_of_the_per_dimension_regularizer():
    """For diagonal S the closed form splits into dimensions, each the per-posterior BD of regularizers.py."""
    mu = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.5, -4.0]], dtype=torch.float64)
    m, s = mixture_moments(mu, logvar)
    assert gaussian_bd(m, s).item() == pytest.approx(REGULARIZERS["bhattacharyya"](mu, logvar).item(), rel=1e-12)


def test_the_mixture_moments_are_those_of_its_draws():
    gen = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(6, 2, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    m, s = mixture_moments(mu, logvar)
    pick = torch.randint(0, 6, (400_000,), generator=gen)
    z = mu[pick] + torch.exp(0.5 * logvar[pick]) * torch.randn(400_000, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(m, z.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(s, torch.cov(z.T), atol=0.02, rtol=0)


def test_the_prior_itself_scores_zero():
    mu, logvar = torch.zeros(1, 4), torch.zeros(1, 4)
    assert AGGREGATES["bhattacharyya"](mu, logvar, mu, mu).item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("name", sorted(AGGREGATES))
def test_the_gradient_is_finite_at_a_degenerate_batch(name):
    """Every posterior the same point with a vanishing variance (a collapsed encoder), every draw
    alike: the term is large but finite, and so is its gradient."""
    mu = torch.full((32, 16), 0.5, requires_grad=True)
    logvar = torch.full((32, 16), -80.0, requires_grad=True)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(32, 16)
    prior = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    value = AGGREGATES[name](mu, logvar, z, prior)
    value.backward()
    assert math.isfinite(value.item()) and value.item() > 0
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
    assert mu.grad.abs().sum() > 0  # the term does pull the collapsed batch


def test_mmd_is_unbiased_for_prior_draws_and_positive_for_a_shifted_aggregate():
    gen = torch.Generator().manual_seed(5)
    values = [AGGREGATES["mmd"](None, None, torch.randn(128, 16, generator=gen), torch.randn(128, 16, generator=gen)).item()
              for _ in range(200)]
    mean, error = sum(values) / len(values), torch.tensor(values).std().item() / math.sqrt(len(values))
    assert abs(mean) < 4 * error
    shifted = AGGREGATES["mmd"](None, None, torch.randn(128, 16, generator=gen) + 0.5, torch.randn(128, 16, generator=gen))
    assert shifted.item() > 20 * error


def test_every_aggregate_term_is_tested_here():
    """A guard: a term registered later must get its entries above."""
    assert set(AGGREGATES) == {"bhattacharyya", "mmd"} and NEEDS_PRIOR_DRAWS == {"mmd"}


def test_the_objective_adds_the_weighted_term_to_every_image():
    from bdvae.model import build_model
    from bdvae.objective import loss_sums

    torch.manual_seed(0)
    plain = ObjectiveConfig()
    model = build_model(Config().model, plain, (1, 32, 32)).double()  # float64: the difference of two sums is exact enough
    x, eps = torch.rand(8, 1, 32, 32, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    base = loss_sums(model, x, plain, eps)
    with_term = loss_sums(model, x, ObjectiveConfig(aggregate="bhattacharyya", aggregate_weight=3.0), eps)
    mu, logvar = model.encode(x)
    expected = 3.0 * 8 * AGGREGATES["bhattacharyya"](mu, logvar, mu, mu)
    torch.testing.assert_close(with_term[0] - base[0], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(with_term[1:], base[1:])  # recon_nll and reg as they were


def test_an_unknown_aggregate_or_a_negative_weight_is_one_line():
    with pytest.raises(BdvaeError, match=r"objective.aggregate must be one of bhattacharyya, mmd, got 'bhatacharyya' \(did you mean"):
        ObjectiveConfig(aggregate="bhatacharyya")
    with pytest.raises(BdvaeError, match="objective.aggregate_weight must be >= 0 and finite, got -1.0"):
        ObjectiveConfig(aggregate="mmd", aggregate_weight=-1.0)


@pytest.mark.parametrize("name", sorted(AGGREGATES))
def test_a_run_with_an_aggregate_term_logs_it_on_the_test_pass(name, tmp_path):
    """metrics.jsonl gets test_aggregate, the term over the test images, and test_loss includes it;
    a run without a term has no such key."""
    import bdvae
    from bdvae import rundir
    from conftest import tiny_npz

    data = DataConfig(name="npz", path=str(tiny_npz(tmp_path / "tiny.npz", train=64, test=32, seed=4)))
    train = TrainConfig(epochs=1, batch_size=32)
    objective = ObjectiveConfig(aggregate=name, aggregate_weight=5.0)
    run = bdvae.train(Config(data=data, objective=objective, train=train), tmp_path / "run", progress=False)
    row = json.loads((run / rundir.METRICS_LOG).read_text().splitlines()[-1])
    assert row["test_aggregate"] > 0
    assert row["test_loss"] == pytest.approx(row["test_recon_nll"] + row["test_reg"] + 5.0 * row["test_aggregate"])
    plain = bdvae.train(Config(data=data, train=train), tmp_path / "plain", progress=False)
    assert "test_aggregate" not in (plain / rundir.METRICS_LOG).read_text()
    # A report keeps the two objectives apart, and names the term and its weight.
    for folder in (run, plain):
        bdvae.evaluate(folder, k=2, samples=32, pictures=False, progress=False)
    markdown, _ = bdvae.report([plain, run], tmp_path / "report")
    text = markdown.read_text()
    assert f"bhattacharyya + aggregate {name} ×5" in text and "| bhattacharyya | 1 |" in text
