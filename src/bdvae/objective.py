"""The training objective and its reduction.

loss = mean over the batch of [ -ln p(x|z) summed over pixels + beta * D(q(z|x) || N(0, I)) summed
over latent dimensions ]. Summing within an image and averaging over images makes beta a
per-example weight, independent of the batch size, and beta = 1 with D = KL gives the negative ELBO.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bdvae.config import ObjectiveConfig
from bdvae.likelihoods import LIKELIHOODS
from bdvae.model import VAE
from bdvae.regularizers import REGULARIZERS


@dataclass(frozen=True)
class LossTerms:
    """Batch means of the objective and its two terms (0-dim tensors)."""

    loss: Tensor
    recon_nll: Tensor
    reg: Tensor


def loss_terms(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None) -> LossTerms:
    """The objective on one batch x (B, C, H, W) with values in [0, 1] (already binarized if need be)."""
    x_logits, mu, logvar, _ = model(x, eps)
    recon_nll = LIKELIHOODS[objective.likelihood].nll(x_logits, x, model.log_sigma)  # (B,)
    reg = REGULARIZERS[objective.regularizer](mu, logvar)  # (B,)
    recon_nll, reg = recon_nll.mean(), reg.mean()
    return LossTerms(loss=recon_nll + objective.beta * reg, recon_nll=recon_nll, reg=reg)
