"""Terms on the aggregate posterior: how far a batch's q(z) = mean_i q(z|x_i) is from N(0, I).

The regularizers (regularizers.py) act on each posterior q(z|x) alone. Decoding z ~ N(0, I) gives
good images only where q(z) covers N(0, I); the "prior hole" is a property of q(z), which a term on
the batch's aggregate targets directly while each posterior stays free to be sharp (Zhao et al.
2017, InfoVAE; Tolstikhin et al. 2018, WAE). The objective adds `objective.aggregate_weight`
times the term to every image's loss (objective.py).

Each term is a function ``(mu, logvar, z, prior) -> Tensor`` (0-dim) of the whole batch's
posterior parameters mu, logvar (B, D), its draws z ~ q(z|x) (B, D), and as many draws of N(0, I)
``prior`` (B, D), registered by name in ``AGGREGATES``; ``NEEDS_PRIOR_DRAWS`` names those that use
``prior`` (training then draws it from its generator), ``CHECKED_ON_THE_HOST`` those whose linear
algebra checks its result on the host (torch.linalg.cholesky), which a CUDA graph cannot capture
(steps.py). With several processes the batch is the
global one, gathered over the ranks (distributed.Context.gather_rows), so a term does not depend
on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bdvae.metrics import gaussian_bd, mixture_moments, mmd2_tensor

Aggregate = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
AGGREGATES: dict[str, Aggregate] = {}
NEEDS_PRIOR_DRAWS: set[str] = set()
CHECKED_ON_THE_HOST: set[str] = set()


def register(name: str, needs_prior_draws: bool = False, checked_on_the_host: bool = False) -> Callable[[Aggregate], Aggregate]:
    def add(fn: Aggregate) -> Aggregate:
        if name in AGGREGATES:
            raise ValueError(f"aggregate term {name!r} registered twice")
        AGGREGATES[name] = fn
        if needs_prior_draws:
            NEEDS_PRIOR_DRAWS.add(name)
        if checked_on_the_host:
            CHECKED_ON_THE_HOST.add(name)
        return fn

    return add


@register("bhattacharyya", checked_on_the_host=True)
def bhattacharyya(mu: Tensor, logvar: Tensor, z: Tensor, prior: Tensor) -> Tensor:
    """BD of the batch's moment-matched Gaussian N(m, S) (metrics.mixture_moments) to N(0, I) (gaussian_bd): 0 iff
    the aggregate has the prior's mean and covariance. Exact in mu and logvar (no sampling noise)."""
    return gaussian_bd(*mixture_moments(mu, logvar)).to(mu.dtype)


@register("mmd", needs_prior_draws=True)
def mmd(mu: Tensor, logvar: Tensor, z: Tensor, prior: Tensor) -> Tensor:
    """Unbiased MMD² between the batch's draws z ~ q(z) and as many N(0, I) draws, with the inverse
    multiquadric kernels of `bdvae evaluate`'s prior match (metrics.mmd2_tensor): 0 in expectation
    iff q(z) = N(0, I), whatever its shape (beyond the two moments the Bhattacharyya term sees)."""
    return mmd2_tensor(z, prior).to(z.dtype)
