"""Decoder likelihoods p(x|z): the reconstruction term -ln p(x|z), summed over pixels.

The decoder always outputs ``x_logits`` (B, C, H, W); every likelihood here has the mean image
sigmoid(x_logits) in [0, 1] (``VAE.decode_mean``), and turns the logits into a negative
log-likelihood per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

_HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)


def bernoulli_nll(x_logits: Tensor, x: Tensor, log_sigma: Tensor) -> Tensor:
    """-ln Bernoulli(x | sigmoid(x_logits)) summed over pixels: the binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(x_logits, x, reduction="none").flatten(1).sum(1)


def gaussian_nll(x_logits: Tensor, x: Tensor, log_sigma: Tensor) -> Tensor:
    """-ln N(x | sigmoid(x_logits), sigma²) summed over pixels; the mean is kept in [0, 1]."""
    z = (x - torch.sigmoid(x_logits)) * torch.exp(-log_sigma)
    return (0.5 * z.square() + log_sigma + _HALF_LN_2PI).flatten(1).sum(1)


@dataclass(frozen=True)
class Likelihood:
    """How to score and show a decoder output."""

    nll: Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_logits, x, log_sigma) -> (B,)
    binarize: bool  # train on x ~ Bernoulli(intensity), redrawn every batch (dynamic binarization)
    learn_sigma: bool  # gaussian: sigma is a learned parameter rather than fixed
    proper_density: bool  # whether -nll is a log-density of the data the model sees


LIKELIHOODS: dict[str, Likelihood] = {
    # The reference design's cross-entropy on intensities in [0, 1]: not a density of continuous data.
    "bernoulli": Likelihood(bernoulli_nll, binarize=False, learn_sigma=False, proper_density=False),
    "bernoulli_binarized": Likelihood(bernoulli_nll, binarize=True, learn_sigma=False, proper_density=True),
    "gaussian": Likelihood(gaussian_nll, binarize=False, learn_sigma=False, proper_density=True),
    "gaussian_learned": Likelihood(gaussian_nll, binarize=False, learn_sigma=True, proper_density=True),
}
