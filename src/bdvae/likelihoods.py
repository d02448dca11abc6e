"""Decoder likelihoods p(x|z): the reconstruction term -ln p(x|z), summed over pixels, and the
pixels they score.

Images are stored as uint8; `to_float` makes intensities in [0, 1] of them and `Likelihood.targets`
the values a likelihood scores (intensities, or a binarized draw of them). The decoder always
outputs ``x_logits`` (B, C, H, W); every likelihood here has the mean image sigmoid(x_logits) in
[0, 1] (``VAE.decode_mean``), and turns the logits into a negative log-likelihood per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

_HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)


def to_float(x: Tensor) -> Tensor:
    """Pixels as float32 intensities in [0, 1]: uint8 values are divided by 255, floats kept."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def binarized(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """x ~ Bernoulli(intensity): dynamic binarization (Salakhutdinov & Murray 2008)."""
    return torch.bernoulli(x, generator=generator)


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
    note: str  # what -ln p(x) under it means, printed beside the IWAE figure

    def targets(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What this likelihood scores for `images` (uint8 or intensities): the intensities, or a
        binarized draw of them (with `generator`) where the model trains on binary images."""
        x = to_float(images)
        return binarized(x, generator) if self.binarize else x


_GAUSSIAN_NOTE = "Gaussian likelihood: a density of the continuous pixel values"
LIKELIHOODS: dict[str, Likelihood] = {
    # The reference design's cross-entropy on intensities in [0, 1]: not a density of continuous data.
    "bernoulli": Likelihood(
        bernoulli_nll, binarize=False, learn_sigma=False, proper_density=False,
        note="Bernoulli likelihood on continuous intensities: not a density of the data, so -ln p(x) is not a "
             "true negative log-likelihood; compare it only between runs with the same likelihood"),
    "bernoulli_binarized": Likelihood(
        bernoulli_nll, binarize=True, learn_sigma=False, proper_density=True,
        note="dynamically binarized model: the test set is binarized once with the evaluation seed, so -ln p(x) "
             "compares with published binarized-MNIST figures (Burda et al. 2015: 86.76 nats, one-layer MLP VAE)"),
    "gaussian": Likelihood(gaussian_nll, binarize=False, learn_sigma=False, proper_density=True, note=_GAUSSIAN_NOTE),
    "gaussian_learned": Likelihood(gaussian_nll, binarize=False, learn_sigma=True, proper_density=True,
                                   note=_GAUSSIAN_NOTE),
}
