"""Divergences D(q(z|x) || p(z)) between a diagonal Gaussian posterior and the prior N(0, I).

Each regularizer is a pure function ``(mu, logvar) -> Tensor[B]`` that sums a closed form over
the latent dimensions (the last axis), registered by name in ``REGULARIZERS``. ``logvar`` is
always ln sigma^2. Adding one: write the function, register it, add its 1-D reference integrand
to ``tests/test_regularizers.py``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

Regularizer = Callable[[Tensor, Tensor], Tensor]
REGULARIZERS: dict[str, Regularizer] = {}

_LN2 = math.log(2.0)


def register(name: str) -> Callable[[Regularizer], Regularizer]:
    def add(fn: Regularizer) -> Regularizer:
        if name in REGULARIZERS:
            raise ValueError(f"regularizer {name!r} registered twice")
        REGULARIZERS[name] = fn
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
