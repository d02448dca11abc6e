"""Every registered regularizer against an independent 1-D numerical integral, and its invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from bdvae.regularizers import REGULARIZERS, bind


def _integral(f, mu: float, s: float) -> float:
    """∫ f dz over the real line, split where q = N(mu, s²) and p = N(0, 1) put their mass so
    that quad sees every peak, however narrow or wide."""
    points = sorted({mu + k * s for k in (-60, -8, -1, 0, 1, 8, 60)} | {-60.0, -8.0, 0.0, 8.0, 60.0})
    lo, hi = points[0], points[-1]
    total = sum(integrate.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=500)[0] for a, b in zip(points, points[1:]))
    tails = integrate.quad(f, -np.inf, lo, epsabs=0, epsrel=1e-12)[0] + integrate.quad(f, hi, np.inf, epsabs=0, epsrel=1e-12)[0]
    return total + tails


def reference_kl(mu: float, s: float) -> float:
    """∫ q ln(q/p) dz."""
    return _integral(lambda z: norm.pdf(z, mu, s) * (norm.logpdf(z, mu, s) - norm.logpdf(z)), mu, s)


def reference_bhattacharyya(mu: float, s: float) -> float:
    """-ln ∫ sqrt(q p) dz."""
    return -math.log(_integral(lambda z: math.exp(0.5 * (norm.logpdf(z, mu, s) + norm.logpdf(z))), mu, s))


def reference_hellinger(mu: float, s: float) -> float:
    """1 - ∫ sqrt(q p) dz."""
    return 1.0 - _integral(lambda z: math.exp(0.5 * (norm.logpdf(z, mu, s) + norm.logpdf(z))), mu, s)


def reference_renyi(mu: float, s: float, alpha: float = 0.5) -> float:
    """ln ∫ q^α p^(1-α) dz / (α - 1)."""
    integrand = _integral(lambda z: math.exp(alpha * norm.logpdf(z, mu, s) + (1 - alpha) * norm.logpdf(z)), mu, s)
    return math.log(integrand) / (alpha - 1)


def reference_wasserstein(mu: float, s: float) -> float:
    """∫ (T(z) - z)² p(z) dz with T = F_q⁻¹ ∘ F_p, the optimal (monotone) transport map in 1-D,
    evaluated by scipy's quantile functions (the upper tail through isf/sf, to keep precision)."""
    def transport(z: float) -> float:
        return norm.ppf(norm.cdf(z), mu, s) if z < 0 else norm.isf(norm.sf(z), mu, s)
    return integrate.quad(lambda z: (transport(z) - z) ** 2 * norm.pdf(z), -12, 12,
                          points=[0.0], epsabs=0, epsrel=1e-12, limit=500)[0]


REFERENCES = {"kl": reference_kl, "bhattacharyya": reference_bhattacharyya, "hellinger": reference_hellinger,
              "renyi": reference_renyi, "wasserstein": reference_wasserstein}
NOT_ADDITIVE = {"hellinger"}  # a function of the total BD; see test_hellinger_is_one_minus_the_product_of_bcs

MUS = (0.0, 0.3, -1.0, 2.5, -7.0)
STDS = (1e-3, 0.05, 0.5, 0.9, 1.2, 3.0, 40.0, 1e3)


def test_every_regularizer_has_a_reference():
    assert set(REGULARIZERS) == set(REFERENCES)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
@pytest.mark.parametrize("s", STDS, ids=lambda s: f"s={s:g}")
def test_closed_form_matches_numerical_integration(name, s):
    mu = torch.tensor(MUS, dtype=torch.float64)[:, None]  # (5, 1): five single-dimension posteriors
    logvar = torch.full_like(mu, 2 * math.log(s))
    closed = REGULARIZERS[name](mu, logvar)
    expected = torch.tensor([REFERENCES[name](m, s) for m in MUS], dtype=torch.float64)
    torch.testing.assert_close(closed, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_zero_when_posterior_equals_prior(name):
    zeros = torch.zeros(3, 16)
    assert torch.equal(REGULARIZERS[name](zeros, zeros), torch.zeros(3))


@pytest.mark.parametrize("name", sorted(set(REGULARIZERS) - NOT_ADDITIVE))
def test_additive_over_dimensions_and_non_negative(name):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 8, generator=gen, dtype=torch.float64) * 3
    logvar = torch.randn(64, 8, generator=gen, dtype=torch.float64) * 4
    total = REGULARIZERS[name](mu, logvar)
    per_dim = torch.stack([REGULARIZERS[name](mu[:, i: i + 1], logvar[:, i: i + 1]) for i in range(8)], 1)
    torch.testing.assert_close(total, per_dim.sum(1))
    assert (per_dim > 0).all()


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_finite_values_and_gradients_at_extremes(name, dtype):
    mu = torch.tensor([0.0, 1e3, -1e3, 1e3, -1e3, 0.0, 1e-3], dtype=dtype)[:, None].repeat(1, 3)
    logvar = torch.tensor([-40.0, -40.0, 40.0, 40.0, 0.0, 40.0, 1e-6], dtype=dtype)[:, None].repeat(1, 3)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    value = REGULARIZERS[name](mu, logvar)
    value.sum().backward()
    assert torch.isfinite(value).all()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()


def test_bhattacharyya_is_a_quarter_of_kl_near_the_prior():
    """For q close to p, BD ≈ KL / 4 (both are f-divergence-like with curvature 1/4 apart):
    the reason beta = 1 with BD regularizes less than beta = 1 with KL."""
    mu = torch.tensor([[1e-3]], dtype=torch.float64)
    logvar = torch.tensor([[1e-3]], dtype=torch.float64)
    ratio = REGULARIZERS["bhattacharyya"](mu, logvar) / REGULARIZERS["kl"](mu, logvar)
    torch.testing.assert_close(ratio, torch.tensor([0.25], dtype=torch.float64), rtol=1e-2, atol=0)


def _random_posteriors(n: int = 64, dims: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(n, dims, generator=gen, dtype=torch.float64) * 2,
            torch.randn(n, dims, generator=gen, dtype=torch.float64) * 2)


def test_hellinger_is_one_minus_the_product_of_bcs():
    """1 - H² of a diagonal Gaussian is the product of the per-dimension BCs, and H² stays in [0, 1)."""
    mu, logvar = _random_posteriors()
    per_dim = torch.stack([REGULARIZERS["hellinger"](mu[:, i: i + 1], logvar[:, i: i + 1]) for i in range(8)], 1)
    total = REGULARIZERS["hellinger"](mu, logvar)
    torch.testing.assert_close(1 - total, (1 - per_dim).prod(1))
    assert ((total > 0) & (total < 1)).all()


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.75, 0.99, 1.01, 1.5, 3.0])
@pytest.mark.parametrize("s", [0.05, 0.5, 0.9, 1.1], ids=lambda s: f"s={s:g}")  # s² < α/(α-1) for α <= 3
def test_renyi_of_any_order_matches_numerical_integration(alpha, s):
    mu = torch.tensor(MUS, dtype=torch.float64)[:, None]
    logvar = torch.full_like(mu, 2 * math.log(s))
    closed = bind("renyi", alpha=alpha)(mu, logvar)
    expected = torch.tensor([reference_renyi(m, s, alpha) for m in MUS], dtype=torch.float64)
    torch.testing.assert_close(closed, expected, rtol=1e-6, atol=1e-12)


def test_renyi_limits_are_twice_bd_and_kl():
    """D_½ = 2 D_B exactly; D_α = KL + O(α - 1), with a slope ½ Var_q[ln q/p] that is large for wide q."""
    mu, logvar = _random_posteriors()
    torch.testing.assert_close(bind("renyi", alpha=0.5)(mu, logvar), 2 * REGULARIZERS["bhattacharyya"](mu, logvar))
    for alpha in (1 - 1e-7, 1 + 1e-7):
        torch.testing.assert_close(bind("renyi", alpha=alpha)(mu, logvar), REGULARIZERS["kl"](mu, logvar),
                                   rtol=1e-4, atol=1e-8)


def test_renyi_above_one_is_infinite_for_wide_posteriors():
    """For α = 2 the integral ∫ q² / p diverges once s² >= α / (α - 1) = 2; gradients stay finite."""
    logvar = torch.tensor([[math.log(1.99)], [math.log(2.01)], [40.0]], dtype=torch.float64, requires_grad=True)
    mu = torch.ones_like(logvar, requires_grad=True)
    value = bind("renyi", alpha=2.0)(mu, logvar)
    assert math.isfinite(value[0].item()) and value[1:].tolist() == [math.inf, math.inf]
    value[0].backward()
    assert torch.isfinite(logvar.grad).all() and torch.isfinite(mu.grad).all()


def test_bind_fills_in_parameters_only_where_declared():
    mu, logvar = _random_posteriors(4, 2)
    assert bind("kl", alpha=3.0) is REGULARIZERS["kl"]
    torch.testing.assert_close(bind("renyi", alpha=3.0)(mu * 0.1, logvar * 0.1),
                               REGULARIZERS["renyi"](mu * 0.1, logvar * 0.1, alpha=3.0))
    with pytest.raises(ValueError, match="alpha"):
        REGULARIZERS["renyi"](mu, logvar, alpha=1.0)
