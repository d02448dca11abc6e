"""The training objective and its reduction.

loss = mean over the batch of [ -ln p(x|z) summed over pixels + beta * D(q(z|x) || N(0, I)) summed
over latent dimensions ]. Summing within an image and averaging over images makes beta a
per-example weight, independent of the batch size, and beta = 1 with D = KL gives the negative ELBO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdvae.config import ObjectiveConfig
from bdvae.likelihoods import LIKELIHOODS
from bdvae.model import VAE
from bdvae.regularizers import Regularizer, bind


@dataclass(frozen=True)
class ImageTerms:
    """One batch's terms per image, in fp32: recon_nll and reg (B,), and the posterior's mu,
    logvar and its draw z (B, D)."""

    recon_nll: Tensor
    reg: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


@dataclass(frozen=True)
class LossTerms:
    """Batch means of the objective and its two terms (0-dim tensors)."""

    loss: Tensor
    recon_nll: Tensor
    reg: Tensor


def regularizer(objective: ObjectiveConfig, name: str | None = None) -> Regularizer:
    """The regularizer `name` (default: the objective's own), with the parameters it declares taken
    from the fields of `objective` of the same names (renyi: alpha)."""
    return bind(name or objective.regularizer, **dataclasses.asdict(objective))


def beta_at(objective: ObjectiveConfig, step: int) -> float:
    """The weight of the regularizer at optimizer step `step` (1, 2, ...): linear warm-up from
    beta / warmup_steps to beta over the first warmup_steps steps (Bowman et al. 2016), then beta."""
    if objective.warmup_steps <= 0:
        return objective.beta
    return objective.beta * min(1.0, step / objective.warmup_steps)


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 outputs of an autocast forward as fp32 (fp32 and fp64 stay as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def image_terms(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None) -> ImageTerms:
    """The reparameterised pass (VAE.forward, noise `eps` (B, D) or fresh) over one batch x
    (B, C, H, W) with values in [0, 1] (already binarized if need be), and its terms per image. The
    terms are computed in fp32 also when the model runs under autocast."""
    x_logits, mu, logvar, z = (_at_least_fp32(t) for t in model(x, eps))
    recon_nll = LIKELIHOODS[objective.likelihood].nll(x_logits, x, model.log_sigma)
    return ImageTerms(recon_nll=recon_nll, reg=regularizer(objective)(mu, logvar), mu=mu, logvar=logvar, z=z)


def loss_sums(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None,
              beta: float | None = None) -> Tensor:
    """The objective summed over one batch x (B, C, H, W) with values in [0, 1] (already binarized
    if need be): (3,) = [loss, recon_nll, reg] sums over the images. `beta` (default: objective.beta)
    is the regularizer's weight, as beta_at gives it during warm-up."""
    terms = image_terms(model, x, objective, eps)
    recon_nll, reg = terms.recon_nll.sum(), terms.reg.sum()
    beta = objective.beta if beta is None else beta
    return torch.stack([recon_nll + beta * reg, recon_nll, reg])


def loss_terms(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None,
               beta: float | None = None) -> LossTerms:
    """The batch means of loss_sums: the objective as the module docstring reduces it."""
    loss, recon_nll, reg = loss_sums(model, x, objective, eps, beta) / len(x)
    return LossTerms(loss=loss, recon_nll=recon_nll, reg=reg)


class Objective(nn.Module):
    """loss_sums as a module around the VAE, so that DistributedDataParallel can wrap the whole
    objective: every parameter it touches (the learned sigma of a Gaussian likelihood too) is then
    used inside the wrapped forward, as DDP requires."""

    def __init__(self, model: VAE, objective: ObjectiveConfig):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: Tensor, eps: Tensor, beta: float) -> Tensor:
        return loss_sums(self.model, x, self.objective, eps, beta)
