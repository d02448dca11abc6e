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
from bdvae.regularizers import Regularizer, bind


@dataclass(frozen=True)
class LossTerms:
    """Batch means of the objective and its two terms (0-dim tensors)."""

    loss: Tensor
    recon_nll: Tensor
    reg: Tensor


def regularizer(objective: ObjectiveConfig, name: str | None = None) -> Regularizer:
    """The regularizer `name` (default: the objective's own), its parameters taken from `objective`."""
    return bind(name or objective.regularizer, alpha=objective.alpha)


def beta_at(objective: ObjectiveConfig, step: int) -> float:
    """The weight of the regularizer at optimizer step `step` (1, 2, ...): linear warm-up from
    beta / warmup_steps to beta over the first warmup_steps steps (Bowman et al. 2016), then beta."""
    if objective.warmup_steps <= 0:
        return objective.beta
    return objective.beta * min(1.0, step / objective.warmup_steps)


def loss_terms(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None,
               beta: float | None = None) -> LossTerms:
    """The objective on one batch x (B, C, H, W) with values in [0, 1] (already binarized if need be);
    `beta` (default: objective.beta) is the regularizer's weight, as beta_at gives it during warm-up."""
    x_logits, mu, logvar, _ = model(x, eps)
    recon_nll = LIKELIHOODS[objective.likelihood].nll(x_logits, x, model.log_sigma)  # (B,)
    reg = regularizer(objective)(mu, logvar)  # (B,)
    recon_nll, reg = recon_nll.mean(), reg.mean()
    beta = objective.beta if beta is None else beta
    return LossTerms(loss=recon_nll + beta * reg, recon_nll=recon_nll, reg=reg)
