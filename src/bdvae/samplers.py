"""Latent samplers: the density z is drawn from before it is decoded into an image.

The reference design decodes z ~ N(0, I). After training, the aggregate posterior
q(z) = E_x q(z|x) is not N(0, I): decoding prior draws also lands in regions no training image
maps to (the "prior hole"), and those decode to blends of digits. A fitted sampler is a density
fitted to q(z) after training, on one draw z ~ q(z|x) per training image (or the posterior means,
``fit_on="mean"``), then sampled from (Ghosh et al. 2020, ex-post density estimation; Dai & Wipf
2019, the two-stage VAE; pythae's samplers follow the same protocol).

``SAMPLERS`` maps a kind to its class. A sampler's name is its kind with its options: ``prior``,
``gmm-10`` (a 10-component Gaussian mixture), ``two_stage`` (a second VAE regularized by BD),
``two_stage-kl`` (by another regularizer) or ``flow`` (a masked autoregressive flow). A fitted
sampler is stored in the run directory (rundir.py: its arrays as safetensors, never a pickle, so
drawing from it needs only torch, and zuko for a flow, an optional dependency imported only when a
flow is fitted or loaded; and a JSON of its kind, options, what it was fitted on and the arrays'
sha256).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bdvae import logs, metrics
from bdvae.devices import check_memory
from bdvae.errors import BdvaeError, check_seed, first_line
from bdvae.likelihoods import binarized, to_float

FIT_ON = ("sample", "mean")
ENCODE_BATCH = 1000
DEFAULT_COMPONENTS = 10
DEFAULT_REGULARIZER = "bhattacharyya"
_LN_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """What to fit and how: the kind with its options, the seed, and which latents of the training set."""

    kind: str
    components: int = DEFAULT_COMPONENTS  # gmm: mixture components
    regularizer: str = DEFAULT_REGULARIZER  # two_stage: the second VAE's regularizer
    seed: int = 0  # the draws z ~ q(z|x) and the fit's own randomness (initialisation, data order)
    fit_on: str = "sample"  # "sample": one z ~ q(z|x) per training image; "mean": the posterior means

    def __post_init__(self) -> None:
        from bdvae.regularizers import REGULARIZERS

        if self.kind not in SAMPLERS:
            raise BdvaeError(f"unknown sampler {self.kind!r}; valid kinds: {', '.join(SAMPLERS)}")
        for name in ("components", "seed"):
            if isinstance(value := getattr(self, name), bool) or not isinstance(value, int):
                raise BdvaeError(f"--{name} must be an integer, got {value!r}",
                                 python=f"{name} must be an integer, got {value!r}")
        if self.components <= 0:
            raise BdvaeError(f"--components must be positive, got {self.components}",
                             python=f"components must be positive, got {self.components}")
        if self.regularizer not in REGULARIZERS:
            raise BdvaeError(f"two_stage: unknown regularizer {self.regularizer!r}; valid: {', '.join(REGULARIZERS)}")
        check_seed(self.seed, "--seed", "seed")
        if self.fit_on not in FIT_ON:
            raise BdvaeError(f"--fit-on must be one of {', '.join(FIT_ON)}, got {self.fit_on!r}",
                             python=f"fit_on must be one of {', '.join(map(repr, FIT_ON))}, got {self.fit_on!r}")

    @property
    def name(self) -> str:
        return SAMPLERS[self.kind].name_of(self)


class Sampler:
    """A density over z (D,) to draw from and to score latents with. Subclasses register a kind."""

    kind: ClassVar[str]

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim

    @classmethod
    def name_of(cls, options: FitOptions) -> str:
        return cls.kind

    @classmethod
    def spellings(cls) -> str:
        """How its names are spelled, for messages: "gmm-K (e.g. gmm-10)"."""
        return cls.kind

    @classmethod
    def options_from_suffix(cls, suffix: str) -> dict[str, Any]:
        """The options spelled after the kind in a name ("10" in "gmm-10")."""
        raise BdvaeError(f"sampler {cls.kind!r} takes no options, got {cls.kind}-{suffix}")

    @classmethod
    def requires(cls) -> None:
        """One line if a package the fit needs is missing, checked before the latents are encoded."""

    @classmethod
    def fit(cls, z: Tensor, options: FitOptions, log: Callable[[str], None]) -> Sampler:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws (n, D), float32."""
        raise NotImplementedError

    def log_density(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ln p(z) of latents z (N, D), (N,) in nats (an estimate where the sampler says so)."""
        raise NotImplementedError

    def arrays(self) -> dict[str, Tensor]:
        """What the file holds; from_arrays(arrays(), params()) rebuilds the sampler."""
        return {}

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_arrays(cls, latent_dim: int, arrays: dict[str, Tensor], params: dict[str, Any]) -> Sampler:
        raise NotImplementedError


SAMPLERS: dict[str, type[Sampler]] = {}


def register(kind: str) -> Callable[[type[Sampler]], type[Sampler]]:
    def add(cls: type[Sampler]) -> type[Sampler]:
        if kind in SAMPLERS:
            raise ValueError(f"sampler {kind!r} registered twice")
        cls.kind = kind
        SAMPLERS[kind] = cls
        return cls

    return add


@register("prior")
class Prior(Sampler):
    """N(0, I), the reference design's: nothing to fit."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)

    def log_density(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return metrics.standard_normal_log_density(z.double())


@register("gmm")
class GaussianMixture(Sampler):
    """p(z) = Σ_k w_k N(z | m_k, S_k) with full covariances, fitted by EM (scikit-learn's
    GaussianMixture, k-means initialisation with the seed). Drawing and scoring use torch only:
    the file holds w (K,), m (K, D) and S (K, D, D) in float64."""

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor, converged: bool = True) -> None:
        super().__init__(means.shape[1])
        self.weights, self.means, self.covariances = weights.double(), means.double(), covariances.double()
        self.scale_tril = torch.linalg.cholesky(self.covariances)  # (K, D, D): z = m_k + L_k eps
        self.converged = converged

    @classmethod
    def name_of(cls, options: FitOptions) -> str:
        return f"gmm-{options.components}"

    @classmethod
    def spellings(cls) -> str:
        return "gmm-K (e.g. gmm-10)"

    @classmethod
    def options_from_suffix(cls, suffix: str) -> dict[str, Any]:
        if not suffix.isdigit():
            raise BdvaeError(f"sampler gmm-{suffix}: expected gmm-K with K the number of components, e.g. gmm-10")
        return {"components": int(suffix)}

    @classmethod
    def fit(cls, z: Tensor, options: FitOptions, log: Callable[[str], None]) -> GaussianMixture:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        if options.components > len(z):
            raise BdvaeError(f"gmm-{options.components}: more components than the {len(z)} latents to fit")
        n, d = z.shape  # EM holds each latent's responsibility for each component, and a covariance each, in float64
        check_memory(8 * options.components * (n + d * d), f"gmm-{options.components} on {n:,} latents",
                     torch.device("cpu"), "use fewer --components", python_fix="use fewer components")
        gmm = SkGaussianMixture(n_components=options.components, covariance_type="full", max_iter=500,
                                reg_covar=1e-6, random_state=options.seed % 2**32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported below, in one line
            try:
                gmm.fit(z.double().numpy())
            except ValueError as e:  # e.g. an ill-defined covariance when latents collapse onto a point
                raise BdvaeError(f"gmm-{options.components}: {first_line(e)}") from None
        if not gmm.converged_:
            log(f"gmm-{options.components}: EM did not converge in {gmm.max_iter} iterations; using its last estimate")
        return cls(torch.from_numpy(gmm.weights_), torch.from_numpy(gmm.means_), torch.from_numpy(gmm.covariances_),
                   converged=bool(gmm.converged_))

    def _distribution(self) -> torch.distributions.Distribution:
        mixture = torch.distributions.Categorical(probs=self.weights)
        return torch.distributions.MixtureSameFamily(
            mixture, torch.distributions.MultivariateNormal(self.means, scale_tril=self.scale_tril))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
        z = self.means[component] + (self.scale_tril[component] @ eps.unsqueeze(-1)).squeeze(-1)  # (n, D)
        return z.float()

    def log_density(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self._distribution().log_prob(z.double())

    def arrays(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}

    def params(self) -> dict[str, Any]:
        return {"components": len(self.weights), "converged": self.converged}

    @classmethod
    def from_arrays(cls, latent_dim: int, arrays: dict[str, Tensor], params: dict[str, Any]) -> GaussianMixture:
        weights, means, covariances = arrays["weights"], arrays["means"], arrays["covariances"]
        k = len(weights)
        if means.shape != (k, latent_dim) or covariances.shape != (k, latent_dim, latent_dim):
            raise ValueError(f"arrays of shapes {tuple(means.shape)} and {tuple(covariances.shape)} do not make "
                             f"{k} components over {latent_dim} dimensions")
        return cls(weights, means, covariances, converged=bool(params.get("converged", True)))


def gaussian_nll(z_hat: Tensor, z: Tensor, log_sigma: Tensor) -> Tensor:
    """-ln N(z | z_hat, sigma² I) summed over the last axis: the second stage's likelihood."""
    return (0.5 * ((z - z_hat) * torch.exp(-log_sigma)).square() + log_sigma + 0.5 * _LN_2PI).sum(-1)


@register("two_stage")
class TwoStage(Sampler):
    """The two-stage VAE (Dai & Wipf 2019): a second, small VAE trained on the latent codes. Its
    encoder maps z (D) to q(u|z) = N(mu, diag e^logvar) over u (D); its decoder maps u to the mean
    of p(z|u) = N(z_hat(u), sigma² I) with sigma learned (their gamma, which lets the second stage
    fit a q(z) that is not Gaussian); its regularizer is configurable, BD by default, so a BD model
    stays BD through and through. Sampling decodes u ~ N(0, I) into z = z_hat(u).

    ln p(z) has no closed form: log_density is the IWAE bound with LOG_DENSITY_K samples
    (Burda et al. 2015), a lower bound, as -ln p(x) is for the images."""

    WIDTHS = (256, 256)  # hidden sizes of the second VAE's encoder (the decoder mirrors them)
    EPOCHS = 20
    BATCH = 256
    LR = 1e-3
    LOG_DENSITY_K = 100

    def __init__(self, vae: nn.Module, regularizer: str, losses: list[float] | None = None) -> None:
        super().__init__(vae.decoder[-1].out_features)
        self.vae = vae.eval()
        self.regularizer = regularizer
        self.losses = losses or []

    @staticmethod
    def build(latent_dim: int, log_sigma: float = 0.0) -> nn.Module:
        from bdvae.model import VAE, mlp_decoder, mlp_encoder

        shape = (latent_dim,)  # the "image" is the latent vector itself
        encoder = mlp_encoder(shape, TwoStage.WIDTHS, latent_dim)  # type: ignore[arg-type]
        decoder = nn.Sequential(*list(mlp_decoder(shape, TwoStage.WIDTHS, latent_dim))[:-1])  # type: ignore[arg-type]
        return VAE(encoder, decoder, log_sigma=log_sigma, learn_sigma=True)

    @classmethod
    def name_of(cls, options: FitOptions) -> str:
        return cls.kind if options.regularizer == DEFAULT_REGULARIZER else f"{cls.kind}-{options.regularizer}"

    @classmethod
    def spellings(cls) -> str:
        return f"{cls.kind}, {cls.kind}-REGULARIZER"

    @classmethod
    def options_from_suffix(cls, suffix: str) -> dict[str, Any]:
        return {"regularizer": suffix}

    @classmethod
    def fit(cls, z: Tensor, options: FitOptions, log: Callable[[str], None]) -> TwoStage:
        """Adam on the negative objective, -ln p(z|u) + D(q(u|z) || N(0, I)), over shuffled batches;
        the initial weights, the data order and the noise come from the seed."""
        from bdvae.regularizers import bind

        z = z.float()
        reg = bind(options.regularizer, alpha=0.5)  # renyi: of order 1/2 (twice BD), the objective config's default
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(options.seed)
            vae = cls.build(z.shape[1])
        gen = torch.Generator().manual_seed(options.seed)
        optimizer = torch.optim.Adam(vae.parameters(), lr=cls.LR)
        steps = cls.EPOCHS * math.ceil(len(z) / cls.BATCH)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        vae.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # matrices of 256 x 256: more threads only add synchronisation (benchmarks/samplers.py)
        try:
            losses = cls._train(vae, z, reg, optimizer, schedule, gen)
        finally:
            torch.set_num_threads(threads)
        if not all(math.isfinite(v) for v in losses):
            raise BdvaeError(f"two_stage: the second VAE's loss became non-finite ({losses[-1]}); try another --seed")
        return cls(vae, options.regularizer, losses)

    @classmethod
    def _train(cls, vae: nn.Module, z: Tensor, reg: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
               schedule: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator) -> list[float]:
        """cls.EPOCHS epochs over shuffled batches; the mean loss per latent of each epoch."""
        losses = []
        for _ in range(cls.EPOCHS):
            order = torch.randperm(len(z), generator=gen)
            total = 0.0
            for start in range(0, len(z), cls.BATCH):
                batch = z[order[start: start + cls.BATCH]]
                eps = torch.randn(len(batch), vae.decoder[-1].out_features, generator=gen)
                z_hat, mu, logvar, _ = vae(batch, eps)
                loss = (gaussian_nll(z_hat, batch, vae.log_sigma) + reg(mu, logvar)).sum()
                optimizer.zero_grad(set_to_none=True)
                (loss / len(batch)).backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
            losses.append(total / len(z))
        return losses

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.randn(n, self.latent_dim, generator=generator)
        return torch.cat([self.vae.decode(u[i: i + ENCODE_BATCH]) for i in range(0, n, ENCODE_BATCH)])

    @torch.inference_mode()
    def log_density(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        vae = self.vae

        def log_pz_given_u(u: Tensor, zs: Tensor) -> Tensor:
            return -gaussian_nll(vae.decode(u), zs, vae.log_sigma)

        return metrics.iwae_log_likelihood(vae.encode, log_pz_given_u, z.float(), self.LOG_DENSITY_K,
                                           max_batch=100 * self.LOG_DENSITY_K, generator=generator).double()

    def arrays(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous() for k, v in self.vae.state_dict().items()}

    def params(self) -> dict[str, Any]:
        return {"regularizer": self.regularizer, "widths": list(self.WIDTHS), "epochs": self.EPOCHS,
                "batch_size": self.BATCH, "lr": self.LR, "log_density": f"IWAE bound, K={self.LOG_DENSITY_K}",
                "sigma": math.exp(self.vae.log_sigma.item()), "losses": self.losses}

    @classmethod
    def from_arrays(cls, latent_dim: int, arrays: dict[str, Tensor], params: dict[str, Any]) -> TwoStage:
        vae = cls.build(latent_dim)
        vae.load_state_dict(arrays)
        return cls(vae, str(params["regularizer"]), list(params.get("losses", [])))


FLOW_EXTRA = "pip install 'bdvae[flow]' (or pip install zuko)"


def _zuko() -> Any:
    """zuko, the flow library, an optional dependency; one line if it is missing."""
    try:
        import zuko
    except ImportError:
        raise BdvaeError(f"the flow sampler needs zuko, which is not installed: {FLOW_EXTRA}") from None
    return zuko


@register("flow")
class Flow(Sampler):
    """A masked autoregressive flow (MAF, Papamakarios et al. 2017; pythae's MAFSampler) fitted by
    maximum likelihood: z = m + s * T^-1(u), u ~ N(0, I), with T a stack of TRANSFORMS affine
    autoregressive layers (zuko's MAF, each a MADE of HIDDEN widths, the order reversed between
    layers) and m, s the latents' mean and standard deviation, so the flow sees standardized
    latents. Its density is exact: ln p(z) = ln N(T(x) | 0, I) + ln |det dT/dx| - Σ_d ln s_d, with
    x = (z - m) / s. Drawing inverts T, one pass per latent dimension per layer.

    The fit holds out VALIDATION of the latents and keeps the weights of the epoch that scores them
    best, stopping after PATIENCE epochs without a better one."""

    TRANSFORMS = 3
    HIDDEN = (256, 256)
    EPOCHS = 30
    BATCH = 256
    LR = 1e-3
    VALIDATION = 0.1  # share of the latents held out to pick the epoch
    PATIENCE = 5
    MIN_LATENTS = 20

    def __init__(self, flow: nn.Module, mean: Tensor, std: Tensor, params: dict[str, Any]) -> None:
        super().__init__(len(mean))
        self.flow = flow.eval()
        self.mean, self.std = mean.float(), std.float()  # (D,) each: x = (z - mean) / std
        self.fit_params = params  # the layers' sizes, the fit's settings and losses, zuko's version

    @staticmethod
    def build(latent_dim: int, transforms: int, hidden: tuple[int, ...]) -> nn.Module:
        return _zuko().flows.MAF(latent_dim, transforms=transforms, hidden_features=tuple(hidden))

    @classmethod
    def requires(cls) -> None:
        _zuko()

    @classmethod
    def fit(cls, z: Tensor, options: FitOptions, log: Callable[[str], None]) -> Flow:
        """Adam on -ln p(z) over shuffled batches, cosine schedule; the initial weights, the
        held-out latents and the data order come from the seed."""
        zuko = _zuko()
        n, d = z.shape
        if n < cls.MIN_LATENTS:
            raise BdvaeError(f"flow: needs at least {cls.MIN_LATENTS} latents to fit, got {n}")
        z = z.double()
        mean, std = z.mean(0), z.std(0).clamp_min(1e-6)  # a collapsed dimension: a narrow flow, not a division by 0
        x = ((z - mean) / std).float()  # (N, D), standardized
        gen = torch.Generator().manual_seed(options.seed)
        order = torch.randperm(n, generator=gen)
        held = max(1, int(n * cls.VALIDATION))
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(options.seed)
            flow = cls.build(d, cls.TRANSFORMS, cls.HIDDEN)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same file whatever the core count; 2 threads on a busy CPU crawl
        try:  # ln p(z) = ln p(x) - Σ ln s: the losses are in nats of z, as log_density's
            losses, validation, best = cls._train(flow, x[order[held:]], x[order[:held]], gen, std.log().sum().item())
        finally:
            torch.set_num_threads(threads)
        log(f"flow: held-out -ln p(z) {validation[best]:.3f} after epoch {best + 1} of {len(losses)}")
        params = {"transforms": cls.TRANSFORMS, "hidden_features": list(cls.HIDDEN), "epochs": cls.EPOCHS,
                  "batch_size": cls.BATCH, "lr": cls.LR, "validation": cls.VALIDATION, "patience": cls.PATIENCE,
                  "best_epoch": best + 1, "losses": losses, "validation_losses": validation,
                  "log_density": "exact", "zuko": zuko.__version__}
        return cls(flow, mean, std, params)

    @classmethod
    def _train(cls, flow: nn.Module, x: Tensor, x_val: Tensor, gen: torch.Generator,
               log_det: float) -> tuple[list[float], list[float], int]:
        """At most cls.EPOCHS epochs on x; the mean -ln p(z) per latent of each epoch, on x and on
        x_val, and the epoch whose weights it leaves in `flow`: the best on x_val."""
        optimizer = torch.optim.Adam(flow.parameters(), lr=cls.LR)
        steps = cls.EPOCHS * math.ceil(len(x) / cls.BATCH)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        losses: list[float] = []
        validation: list[float] = []
        best, best_state = 0, None
        for epoch in range(cls.EPOCHS):
            flow.train()
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), cls.BATCH):
                batch = x[order[start: start + cls.BATCH]]
                loss = -flow().log_prob(batch).sum()
                optimizer.zero_grad(set_to_none=True)
                (loss / len(batch)).backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
            losses.append(total / len(x) + log_det)
            flow.eval()
            with torch.no_grad():
                dist = flow()
                held_out = sum(dist.log_prob(x_val[i: i + ENCODE_BATCH]).sum().item()
                               for i in range(0, len(x_val), ENCODE_BATCH))
            validation.append(-held_out / len(x_val) + log_det)
            if not (math.isfinite(losses[-1]) and math.isfinite(validation[-1])):
                raise BdvaeError(f"flow: the loss became non-finite in epoch {epoch + 1} ({losses[-1]}, "
                                 f"held out {validation[-1]}); try another --seed")
            if best_state is None or validation[-1] < validation[best]:
                best, best_state = epoch, {k: v.clone() for k, v in flow.state_dict().items()}
            elif epoch - best >= cls.PATIENCE:  # no better epoch for PATIENCE epochs: over-fitting
                break
        flow.load_state_dict(best_state)
        return losses, validation, best

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.randn(n, self.latent_dim, generator=generator)  # the base noise, from the caller's generator
        inverse = self.flow().transform.inv  # u -> x
        x = torch.cat([inverse(u[i: i + ENCODE_BATCH]) for i in range(0, n, ENCODE_BATCH)])
        return self.mean + self.std * x

    @torch.inference_mode()
    def log_density(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dist = self.flow()
        x = (z.float() - self.mean) / self.std
        log_px = torch.cat([dist.log_prob(x[i: i + ENCODE_BATCH]) for i in range(0, len(x), ENCODE_BATCH)])
        return log_px.double() - self.std.double().log().sum()

    def arrays(self) -> dict[str, Tensor]:
        weights = {f"flow.{k}": v.detach().contiguous() for k, v in self.flow.state_dict().items()}
        return {"mean": self.mean, "std": self.std, **weights}

    def params(self) -> dict[str, Any]:
        return self.fit_params

    @classmethod
    def from_arrays(cls, latent_dim: int, arrays: dict[str, Tensor], params: dict[str, Any]) -> Flow:
        mean, std = arrays["mean"], arrays["std"]
        if mean.shape != (latent_dim,) or std.shape != (latent_dim,):
            raise ValueError(f"standardization of shapes {tuple(mean.shape)} and {tuple(std.shape)}, "
                             f"not ({latent_dim},)")
        flow = cls.build(latent_dim, int(params["transforms"]), tuple(int(h) for h in params["hidden_features"]))
        flow.load_state_dict({k.removeprefix("flow."): v for k, v in arrays.items() if k.startswith("flow.")})
        return cls(flow, mean, std, params)


def fitted_kinds() -> str:
    """The kinds that are fitted, for messages: "gmm, two_stage or flow"."""
    kinds = [kind for kind in SAMPLERS if kind != "prior"]
    return f"{', '.join(kinds[:-1])} or {kinds[-1]}"


def parse_name(name: str) -> FitOptions:
    """The options a sampler name spells: "gmm-10" -> gmm with 10 components, "two_stage-kl" ->
    two_stage with KL, a bare kind -> its defaults. One line on an unknown name."""
    kind, sep, suffix = name.strip().partition("-")
    if kind not in SAMPLERS:
        raise BdvaeError(f"unknown sampler {name!r}; valid: {', '.join(c.spellings() for c in SAMPLERS.values())}")
    options = FitOptions(kind=kind, **(SAMPLERS[kind].options_from_suffix(suffix) if sep else {}))
    return options


def canonical_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The names as parse_name spells them ("gmm" -> "gmm-10"), the prior first, each once."""
    return tuple(dict.fromkeys(["prior", *(parse_name(n).name for n in names)]))


@torch.inference_mode()
def training_latents(model: nn.Module, images: Tensor, binarize: bool, fit_on: str, seed: int) -> Tensor:
    """The latents a sampler is fitted on: per training image (uint8, (N, C, H, W)) one draw
    z ~ q(z|x) (``fit_on="sample"``, pythae's protocol) or its mean mu; (N, D) float32. A binarized
    model sees binarized images, as in training, drawn with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(images), ENCODE_BATCH):
        x = to_float(images[start: start + ENCODE_BATCH])
        if binarize:
            x = binarized(x, gen)
        mu, logvar = model.encode(x)
        out.append(mu if fit_on == "mean" else mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen))
    return torch.cat(out)


def fit(model: nn.Module, binarize: bool, train_images: Tensor, options: FitOptions,
        log: Callable[[str], None] = logs.info) -> tuple[Sampler, int]:
    """The sampler `options` describes, fitted on the training latents of `model`; and how many
    latents it saw."""
    if options.kind == "prior":
        raise BdvaeError(f"the prior N(0, I) needs no fitting; fit {fitted_kinds()}")
    SAMPLERS[options.kind].requires()
    z = training_latents(model, train_images, binarize, options.fit_on, options.seed)
    what = "posterior means" if options.fit_on == "mean" else "one z ~ q(z|x) per training image"
    log(f"fitting {options.name} on {len(z)} latents ({what}, seed {options.seed})")
    return SAMPLERS[options.kind].fit(z, options, log), len(z)


def fit_call(run_dir: Path, options: FitOptions) -> str:
    """The Python call that fits the sampler `options` names."""
    extra = {"gmm": f", components={options.components}",
             "two_stage": f", regularizer={options.regularizer!r}" if options.regularizer != DEFAULT_REGULARIZER else ""}
    return f"bdvae.load_run({str(run_dir)!r}).fit_sampler({options.kind!r}{extra.get(options.kind, '')})"


def fit_command(run_dir: Path, options: FitOptions) -> str:
    """The `bdvae sampler fit` command line that fits the sampler `options` names."""
    extra = {"gmm": f" --components {options.components}",
             "two_stage": f" --regularizer {options.regularizer}" if options.regularizer != DEFAULT_REGULARIZER else ""}
    return f"bdvae sampler fit {run_dir} {options.kind}{extra.get(options.kind, '')}"
