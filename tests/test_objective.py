"""The loss reduction: sum over pixels and latent dimensions, mean over the batch."""

import math

import pytest
import torch
from torch.nn import functional as F

from bdvae.config import ModelConfig, ObjectiveConfig
from bdvae.likelihoods import LIKELIHOODS
from bdvae.model import build_model
from bdvae.objective import beta_at, loss_terms, regularizer
from bdvae.regularizers import PARAMETERS, REGULARIZERS


def _model_and_batch(likelihood="bernoulli"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(), ObjectiveConfig(likelihood=likelihood), (1, 32, 32))
    x = torch.rand(5, 1, 32, 32)
    eps = torch.randn(5, 16)
    return model, x, eps


def test_reduction_is_sum_over_pixels_and_dimensions_mean_over_batch():
    model, x, eps = _model_and_batch()
    objective = ObjectiveConfig(beta=2.5)
    terms = loss_terms(model, x, objective, eps)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        x_logits = model.decode(mu + torch.exp(0.5 * logvar) * eps)
        recon = sum(F.binary_cross_entropy_with_logits(x_logits[i], x[i], reduction="sum") for i in range(5)) / 5
        sq = torch.exp(logvar)
        bd = (0.25 * mu**2 / (sq + 1) + 0.5 * torch.log((sq + 1) / (2 * sq.sqrt()))).sum() / 5
    torch.testing.assert_close(terms.recon_nll, recon)
    torch.testing.assert_close(terms.reg, bd)
    torch.testing.assert_close(terms.loss, recon + 2.5 * bd)


def test_kl_beta_one_is_the_negative_elbo_and_independent_of_batch_size():
    model, x, eps = _model_and_batch()
    objective = ObjectiveConfig(regularizer="kl")
    whole = loss_terms(model, x, objective, eps).loss
    halves = [loss_terms(model, x[i: i + 1], objective, eps[i: i + 1]).loss for i in range(5)]
    torch.testing.assert_close(whole, torch.stack(halves).mean())


def test_gaussian_likelihood_is_the_normal_density():
    x = torch.rand(2, 1, 4, 4)
    x_logits = torch.randn(2, 1, 4, 4)
    log_sigma = torch.tensor(math.log(0.3))
    nll = LIKELIHOODS["gaussian"].nll(x_logits, x, log_sigma)
    expected = -torch.distributions.Normal(torch.sigmoid(x_logits), 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(nll, expected)


def test_learned_sigma_is_a_parameter_fixed_sigma_is_not():
    learned = build_model(ModelConfig(), ObjectiveConfig(likelihood="gaussian_learned"), (1, 32, 32))
    fixed = build_model(ModelConfig(), ObjectiveConfig(likelihood="gaussian"), (1, 32, 32))
    assert any(p is learned.log_sigma for p in learned.parameters())
    assert not any(p is fixed.log_sigma for p in fixed.parameters())
    assert "log_sigma" in fixed.state_dict()


def test_regularizer_registry_is_what_the_objective_uses():
    model, x, eps = _model_and_batch()
    for name, fn in REGULARIZERS.items():
        terms = loss_terms(model, x, ObjectiveConfig(regularizer=name), eps)
        with torch.no_grad():
            mu, logvar = model.encode(x)
        torch.testing.assert_close(terms.reg, fn(mu, logvar).mean())


def test_beta_warm_up_is_linear_then_constant():
    objective = ObjectiveConfig(beta=2.0, warmup_steps=4)
    assert [beta_at(objective, step) for step in range(1, 7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert beta_at(ObjectiveConfig(beta=2.0), 1) == 2.0  # no warm-up by default


def test_loss_uses_the_beta_it_is_given():
    model, x, eps = _model_and_batch()
    objective = ObjectiveConfig(beta=3.0, warmup_steps=10)
    full = loss_terms(model, x, objective, eps)
    warm = loss_terms(model, x, objective, eps, beta=beta_at(objective, 1))
    torch.testing.assert_close(warm.loss, full.recon_nll + 0.3 * full.reg)


def test_renyi_order_comes_from_the_objective():
    model, x, eps = _model_and_batch()
    with torch.no_grad():
        mu, logvar = model.encode(x)
    terms = loss_terms(model, x, ObjectiveConfig(regularizer="renyi", alpha=0.2), eps)
    torch.testing.assert_close(terms.reg, REGULARIZERS["renyi"](mu, logvar, alpha=0.2).mean())


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_every_likelihood_carries_its_note_and_its_targets(name):
    likelihood = LIKELIHOODS[name]
    assert len(likelihood.note) > 20 and ("not a density" in likelihood.note) == (not likelihood.proper_density)
    images = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8).repeat(200, 1, 1, 1)
    x = likelihood.targets(images, torch.Generator().manual_seed(0))
    if likelihood.binarize:  # a draw of 0s and 1s whose mean is the intensity
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(x.mean(0).flatten(), torch.tensor([0.0, 128 / 255, 1.0]), atol=0.1, rtol=0)
    else:
        torch.testing.assert_close(x[0].flatten(), torch.tensor([0.0, 128 / 255, 1.0]))


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_every_regularizer_gets_the_objective_fields_it_declares(name):
    """regularizer(objective) passes each field a regularizer declares (PARAMETERS) and no other."""
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    objective = ObjectiveConfig(regularizer=name, alpha=0.3)
    expected = REGULARIZERS[name](mu, logvar, **{p: getattr(objective, p) for p in PARAMETERS[name]})
    torch.testing.assert_close(regularizer(objective)(mu, logvar), expected)
