"""Divergences D(q(z|x) || p(z)) between a diagonal Gaussian posterior and the prior N(0, I).

Each regularizer is a pure function ``(mu, logvar) -> Tensor[B]`` that sums a closed form over
the latent dimensions (the last axis), registered by name in ``REGULARIZERS`` (Hellinger² is the
one that is not a sum: it is a function of the summed BD). A regularizer with a parameter (the
Rényi order alpha) takes it as a keyword argument named like its ObjectiveConfig field, listed in
``PARAMETERS``; ``bind`` fills it in. ``logvar`` is
always ln sigma^2. Adding one: write the function, register it, add its 1-D reference integrand
to ``tests/test_regularizers.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

Regularizer = Callable[..., Tensor]  # (mu, logvar, **params) -> (B,)
REGULARIZERS: dict[str, Regularizer] = {}
# Names of the ObjectiveConfig fields a regularizer takes as keyword arguments (renyi: alpha).
PARAMETERS: dict[str, tuple[str, ...]] = {}

_LN2 = math.log(2.0)


def register(name: str, params: tuple[str, ...] = ()) -> Callable[[Regularizer], Regularizer]:
    def add(fn: Regularizer) -> Regularizer:
        if name in REGULARIZERS:
            raise ValueError(f"regularizer {name!r} registered twice")
        REGULARIZERS[name] = fn
        PARAMETERS[name] = params
        return fn

    return add


def log_cosh(x: Tensor) -> Tensor:
    """ln cosh(x), accurate near 0 and finite (with finite gradient) for large |x|.

    Near 0, cosh x = 1 + 2 sinh^2(x/2), and log1p keeps the O(x^2) value to full relative
    precision. Far from 0, ln cosh x = |x| + ln(1 + e^{-2|x|}) - ln 2 never overflows.
    The small branch gets a clamped input so that torch.where never sees an inf in either branch.
    """
    ax = x.abs()
    small = torch.log1p(2.0 * torch.sinh(0.5 * x.clamp(-1.0, 1.0)) ** 2)
    large = ax + F.softplus(-2.0 * ax) - _LN2
    return torch.where(ax < 1.0, small, large)


@register("bhattacharyya")
def bhattacharyya(mu: Tensor, logvar: Tensor) -> Tensor:
    """Bhattacharyya distance D_B(N(mu, s^2), N(0, 1)), summed over dimensions.

    D_B = -ln ∫ sqrt(q p) dz = mu² / (4 (s² + 1)) + ½ ln((s² + 1) / (2 s))   (Bhattacharyya 1943).
    With s = exp(logvar / 2), (s² + 1) / (2 s) = cosh(logvar / 2) and 1 / (s² + 1) =
    sigmoid(-logvar), so D_B = ¼ mu² sigmoid(-logvar) + ½ ln cosh(logvar / 2): no exp of a
    large logvar, no division by a vanishing s, exact zero at q = p.
    """
    return (0.25 * mu.square() * torch.sigmoid(-logvar) + 0.5 * log_cosh(0.5 * logvar)).sum(-1)


@register("kl")
def kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Kullback-Leibler divergence KL(N(mu, s^2) || N(0, 1)), summed over dimensions.

    KL = ∫ q ln(q/p) dz = ½ (mu² + s² - ln s² - 1)   (Kingma & Welling 2014, appendix B).
    Written as ½ (mu² + expm1(logvar) - logvar): exactly 0 at q = p, and no ln of a vanishing s.
    """
    return 0.5 * (mu.square() + torch.expm1(logvar) - logvar).sum(-1)


@register("hellinger")
def hellinger(mu: Tensor, logvar: Tensor) -> Tensor:
    """Squared Hellinger distance H²(N(mu, diag s²), N(0, I)) of the whole latent vector.

    H² = 1 - ∫ sqrt(q p) dz = 1 - BC, and BC = exp(-D_B) is a product over dimensions, so
    H² = -expm1(-Σ_d D_B,d): bounded by 1 and NOT a sum over dimensions. Its gradient fades as
    H² -> 1, so a posterior far from the prior is pulled back only weakly.
    """
    return -torch.expm1(-bhattacharyya(mu, logvar))


@register("renyi", params=("alpha",))
def renyi(mu: Tensor, logvar: Tensor, alpha: float = 0.5) -> Tensor:
    """Rényi divergence of order alpha, D_α(N(mu, s²) || N(0, 1)), summed over dimensions.

    D_α = ln ∫ q^α p^(1-α) dz / (α - 1)
        = -½ ln s² - ln s_α² / (2 (α - 1)) + α mu² / (2 s_α²),   s_α² = α + (1 - α) s²
    (Gil, Alajaji & Linder 2013, table 2). α = ½ gives 2 D_B; α -> 1 gives KL. For α > 1 the
    integral diverges once s² >= α / (α - 1), and the value is +inf there: a posterior wider
    than that cannot be trained with such an α.
    s_α² = 1 + (1 - α) expm1(logvar) keeps the exact zero at q = p; for α < 1 and large logvar,
    ln s_α² = logaddexp(ln α, ln(1 - α) + logvar) avoids overflowing exp(logvar).
    """
    if not (alpha > 0 and alpha != 1 and math.isfinite(alpha)):
        raise ValueError(f"renyi: alpha must be positive, finite and not 1, got {alpha!r}")
    if alpha < 1:
        near = torch.log1p((1 - alpha) * torch.expm1(logvar.clamp(max=1.0)))
        far = torch.logaddexp(torch.full_like(logvar, math.log(alpha)), math.log(1 - alpha) + logvar)
        log_var_alpha = torch.where(logvar < 1.0, near, far)
    else:
        # s_α² - 1 = (1 - α) expm1(logvar) must stay above -1; elsewhere a harmless 0 stands in,
        # so that neither the value nor the gradient of the discarded branch is NaN.
        excess = (1 - alpha) * torch.expm1(logvar)
        inside = excess > -1
        log_var_alpha = torch.log1p(torch.where(inside, excess, torch.zeros_like(excess)))
    per_dim = (-0.5 * logvar - log_var_alpha / (2 * (alpha - 1))
               + 0.5 * alpha * mu.square() * torch.exp(-log_var_alpha))
    if alpha > 1:
        per_dim = torch.where(inside, per_dim, torch.full_like(per_dim, math.inf))
    return per_dim.sum(-1)


@register("wasserstein")
def wasserstein(mu: Tensor, logvar: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance W₂²(N(mu, diag s²), N(0, I)), a sum over dimensions.

    W₂² = inf over couplings E|z - z'|² = Σ_d mu² + (s - 1)²   (Dowson & Landau 1982; for
    diagonal Gaussians the coordinate-wise quantile map is optimal). (s - 1)² is written as
    expm1(logvar / 2)², exact near s = 1. It is the square of the distance, as a loss term
    should be: W₂ itself has no gradient at q = p.
    """
    return (mu.square() + torch.expm1(0.5 * logvar).square()).sum(-1)


def bind(name: str, **available: Any) -> Regularizer:
    """REGULARIZERS[name] with its parameters (PARAMETERS[name]) taken from `available`:
    ``bind("renyi", alpha=0.3, ...)(mu, logvar)``."""
    fn = REGULARIZERS[name]
    params = {p: available[p] for p in PARAMETERS[name]}
    return functools.partial(fn, **params) if params else fn
