"""The training objective and its reduction.

loss = mean over the batch of [ -ln p(x|z) summed over pixels + beta * D(q(z|x) || N(0, I)) summed
over latent dimensions ]. Summing within an image and averaging over images makes beta a
per-example weight, independent of the batch size, and beta = 1 with D = KL gives the negative ELBO.
With `objective.aggregate` set, every image's loss also gets `aggregate_weight` times a term on the
batch's aggregate posterior (aggregates.py), the same for every image of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdvae.aggregates import AGGREGATES
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


def aggregate_term(objective: ObjectiveConfig, terms: ImageTerms, prior: Tensor | None = None,
                   gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """objective.aggregate's term (0-dim) over the batch of `terms`, with `prior` (B, D) draws of
    N(0, I) where the term needs them; `gather` makes the batch the global one of several ranks."""
    gather = gather or (lambda t: t)
    return AGGREGATES[objective.aggregate](gather(terms.mu), gather(terms.logvar), gather(terms.z), prior)  # type: ignore[index]


def loss_sums(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None,
              beta: float | None = None, prior: Tensor | None = None,
              gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The objective summed over one batch x (B, C, H, W) with values in [0, 1] (already binarized
    if need be): (3,) = [loss, recon_nll, reg] sums over the images. `beta` (default: objective.beta)
    is the regularizer's weight, as beta_at gives it during warm-up. `prior` and `gather`: the
    aggregate term's (aggregate_term), where objective.aggregate is set."""
    terms = image_terms(model, x, objective, eps)
    recon_nll, reg = terms.recon_nll.sum(), terms.reg.sum()
    beta = objective.beta if beta is None else beta
    loss = recon_nll + beta * reg
    if objective.aggregate is not None:
        loss = loss + objective.aggregate_weight * len(x) * aggregate_term(objective, terms, prior, gather)
    return torch.stack([loss, recon_nll, reg])


def loss_terms(model: VAE, x: Tensor, objective: ObjectiveConfig, eps: Tensor | None = None,
               beta: float | None = None, prior: Tensor | None = None) -> LossTerms:
    """The batch means of loss_sums: the objective as the module docstring reduces it."""
    loss, recon_nll, reg = loss_sums(model, x, objective, eps, beta, prior) / len(x)
    return LossTerms(loss=loss, recon_nll=recon_nll, reg=reg)


class Objective(nn.Module):
    """loss_sums as a module around the VAE, so that DistributedDataParallel can wrap the whole
    objective: every parameter it touches (the learned sigma of a Gaussian likelihood too) is then
    used inside the wrapped forward, as DDP requires. `gather(t, total)`: the rows of every rank's
    shard of a global batch of `total` (distributed.Context.gather_rows), for the aggregate term."""

    def __init__(self, model: VAE, objective: ObjectiveConfig,
                 gather: Callable[[Tensor, int], Tensor] | None = None):
        super().__init__()
        self.model = model
        self.objective = objective
        self.gather = gather

    def forward(self, x: Tensor, eps: Tensor, beta: float, total: int | None = None,
                prior: Tensor | None = None) -> Tensor:
        gather = None if self.gather is None or total is None else (lambda t: self.gather(t, total))  # type: ignore[misc]
        return loss_sums(self.model, x, self.objective, eps, beta, prior, gather)
