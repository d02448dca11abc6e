"""The options of an evaluation (`bdvae evaluate`, and `bdvae compare` for each run): not part of a
run's config, but written beside its figures in metrics.json. This module imports no torch, so
that the command line declares a flag per field, with the field's default and, from its
docstring, its help.
"""

from __future__ import annotations

from dataclasses import dataclass

from bdvae.errors import BdvaeError, check_seed

DEFAULT_K = 100
DTYPES = ("auto", "fp32", "bf16")  # the IWAE decoder's arithmetic (EvalOptions.dtype)
MIN_IMAGES = 16  # the pictures use 16 test images; k-NN radii and covariances need a handful


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """What `bdvae evaluate` computes, and on how much. Each field is a flag of `bdvae evaluate`
    (and most of `bdvae compare`), its docstring the flag's help."""

    k: int = DEFAULT_K
    """Importance samples per test image for the IWAE bound on -ln p(x): more is tighter and slower."""
    samples: int = 10000
    """Images decoded from each sampler for the sample-quality scores, which depend on it."""
    test_size: int | None = None
    """Evaluate on the first N test images only (unset: all)."""
    seed: int = 0
    """Seed of every random draw of the evaluation (binarization, z, samples)."""
    max_batch: int | None = None
    """Most latents decoded at once, which bounds memory whatever k is (unset: 256 on a CPU, whose caches more
    would leave; on a GPU as many as a quarter of its free memory holds, a power of 2; a CPU decodes at most 256)."""
    # Called "precision" in metrics.json before, a word that now means only the sample-quality metric.
    dtype: str = "auto"
    """The IWAE decoder's arithmetic: auto (bf16 where the device computes it natively, else fp32), fp32 or bf16."""
    pictures: bool = True
    """Draw the pictures in RUN/eval/."""
    samplers: tuple[str, ...] = ("prior",)
    """The latent samplers whose draws are scored: prior (N(0, I), always scored), gmm-K, two_stage[-REGULARIZER], flow;
    those not fitted yet are fitted first, with seed 0."""

    def __post_init__(self) -> None:
        from bdvae.samplers import canonical_names  # torch: when options are made, not when flags are declared

        for name, flag in (("k", "-k"), ("max_batch", "--max-batch")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BdvaeError(f"{flag} must be positive, got {value}", python=f"{name} must be positive, got {value}")
        for name, flag in (("samples", "--samples"), ("test_size", "--test-size")):
            value = getattr(self, name)
            if value is not None and value < MIN_IMAGES:
                raise BdvaeError(f"{flag} must be at least {MIN_IMAGES}, got {value}",
                                 python=f"{name} must be at least {MIN_IMAGES}, got {value}")
        check_seed(self.seed, "--seed", "seed")
        if self.dtype not in DTYPES:
            raise BdvaeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}",
                             python=f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {self.dtype!r}")
        names = (self.samplers,) if isinstance(self.samplers, str) else self.samplers
        object.__setattr__(self, "samplers", canonical_names(names))  # "gmm" -> "gmm-10", prior first
