"""Encoder, decoder and VAE modules: no losses, no I/O.

The encoder maps x (B, C, H, W) to the posterior parameters mu, logvar (B, D); the decoder maps
z (B, D) to x_logits (B, C, H, W). Each architecture is an entry of ``ARCHITECTURES`` that carries
what the rest of bdvae asks of it: its builders, default widths, the options and fixed values it
takes from the config, and the image shapes it accepts. ``build_model`` turns a config into modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bdvae.errors import BdvaeError
from bdvae.kernels import ContiguousGroupNorm, ImageConvTranspose2d
from bdvae.likelihoods import LIKELIHOODS

Shape = tuple[int, int, int]  # (C, H, W)


def relu() -> nn.ReLU:
    """ReLU in place: the layer before it keeps no use for its output, so autograd allows it (and
    would raise if it did not), and a training step allocates and writes one tensor fewer per ReLU
    (docs/results/performance.md). The same values and gradients, bit for bit."""
    return nn.ReLU(inplace=True)


def conv_encoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int) -> nn.Sequential:
    """Conv(k4, s2, p1)-ReLU per width, each halving H and W, then Linear(-> 2 D)."""
    c, h, w = shape
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c, width, 4, 2, 1), relu()]
        c = width
    scale = 2 ** len(widths)
    layers += [nn.Flatten(), nn.Linear(c * (h // scale) * (w // scale), 2 * latent_dim)]
    return nn.Sequential(*layers)


def conv_decoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int) -> nn.Sequential:
    """Linear(D ->)-ReLU, then ConvTranspose(k4, s2, p1) per width in reverse, the last giving logits."""
    c, h, w = shape
    scale = 2 ** len(widths)
    hidden = (widths[-1], h // scale, w // scale)
    layers: list[nn.Module] = [nn.Linear(latent_dim, math.prod(hidden)), relu(), nn.Unflatten(1, hidden)]
    outs = list(reversed(widths[:-1])) + [c]
    for i, (c_in, c_out) in enumerate(zip(reversed(widths), outs)):
        deconv = ImageConvTranspose2d if i == len(widths) - 1 else nn.ConvTranspose2d
        layers += [deconv(c_in, c_out, 4, 2, 1), relu()]
    return nn.Sequential(*layers[:-1])  # no ReLU on the logits


GROUPS = 8  # GroupNorm's groups where the width allows (else the greatest common divisor)


def group_norm(width: int) -> nn.GroupNorm:
    """GroupNorm over groups of channels of each image (Wu and He 2018): unlike BatchNorm, what a
    layer gives one image does not depend on the others in its batch, in training as in evaluation.
    (ContiguousGroupNorm: plain GroupNorm, faster in bf16 on a CPU.)"""
    return ContiguousGroupNorm(math.gcd(GROUPS, width), width)


# model.norm: the normalisation after each convolution of the resnet architecture.
NORMS: dict[str, Callable[[int], nn.Module]] = {"batch": nn.BatchNorm2d, "group": group_norm}


class ResidualBlock(nn.Module):
    """x -> ReLU(x + N(Conv3x3(ReLU(N(Conv3x3(x)))))), N a normalisation (BatchNorm unless `norm`
    says otherwise): the basic block of He et al. 2016, its second normalisation's scale starting at
    zero so that each block starts as the identity (Goyal et al. 2017). The convolutions have no
    bias (the normalisation after each has one)."""

    def __init__(self, width: int, norm: str = "batch"):
        super().__init__()
        make = NORMS[norm]
        self.branch = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, bias=False), make(width), relu(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), make(width))
        nn.init.zeros_(self.branch[-1].weight)
        self.out = relu()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + self.branch(x))


def resnet_encoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int,
                   blocks: int = 1, norm: str = "batch") -> nn.Sequential:
    """The conv encoder with a normalisation N (NORMS[norm]) after each stride-2 convolution and
    `blocks` residual blocks at each resolution: per width Conv(k4, s2, p1)-N-ReLU-ResidualBlock x
    blocks, then Linear(-> 2 D)."""
    c, h, w = shape
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c, width, 4, 2, 1, bias=False), NORMS[norm](width), relu()]
        layers += [ResidualBlock(width, norm) for _ in range(blocks)]
        c = width
    scale = 2 ** len(widths)
    layers += [nn.Flatten(), nn.Linear(c * (h // scale) * (w // scale), 2 * latent_dim)]
    return nn.Sequential(*layers)


def resnet_decoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int,
                   blocks: int = 1, norm: str = "batch") -> nn.Sequential:
    """The encoder's mirror: Linear(D ->)-N-ReLU, then per width in reverse ResidualBlock x blocks
    and ConvTranspose(k4, s2, p1), each but the last (which gives the logits) followed by N-ReLU."""
    c, h, w = shape
    scale = 2 ** len(widths)
    hidden = (widths[-1], h // scale, w // scale)
    layers: list[nn.Module] = [nn.Linear(latent_dim, math.prod(hidden), bias=False), nn.Unflatten(1, hidden),
                               NORMS[norm](widths[-1]), relu()]
    outs = list(reversed(widths[:-1])) + [c]
    for c_in, c_out in zip(reversed(widths), outs):
        layers += [ResidualBlock(c_in, norm) for _ in range(blocks)]
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), NORMS[norm](c_out), relu()]
    layers[-3] = ImageConvTranspose2d(widths[0], c, 4, 2, 1)  # the logits: a bias, no normalisation, no ReLU
    return nn.Sequential(*layers[:-2])


def mlp_encoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    n = math.prod(shape)
    for width in widths:
        layers += [nn.Linear(n, width), relu()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, 2 * latent_dim))


def mlp_decoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    n = latent_dim
    for width in reversed(widths):
        layers += [nn.Linear(n, width), relu()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, math.prod(shape)), nn.Unflatten(1, shape))


def strided_shape_problem(shape: Shape, widths: tuple[int, ...]) -> str | None:
    """What stops a stack of stride-2 layers, one per width, from taking images of `shape`."""
    scale = 2 ** len(widths)
    if shape[1] % scale or shape[2] % scale:
        return (f"with {len(widths)} stride-2 layers needs image height and width divisible by {scale}, got "
                f"{shape[1]}x{shape[2]} (set data.pad or data.image_size)")
    return None


def resnet_shape_problem(shape: Shape, widths: tuple[int, ...]) -> str | None:
    """The stride-2 rule, and more than one pixel at the lowest resolution: BatchNorm in training
    needs more than one value per channel, even from a batch of 1 (as GroupNorm does per group)."""
    scale = 2 ** len(widths)
    if problem := strided_shape_problem(shape, widths):
        return problem
    if shape[1] * shape[2] < 2 * scale * scale:
        return (f"with {len(widths)} stride-2 layers needs images larger than {scale}x{scale} (its normalisations need "
                f"more than one pixel at the lowest resolution), got {shape[1]}x{shape[2]}")
    return None


@dataclass(frozen=True)
class Architecture:
    """An entry of ARCHITECTURES: what builds the encoder and the decoder, and what they take."""

    encoder: Callable[..., nn.Module]  # (shape, widths, latent_dim, **options) -> x (B, C, H, W) to (B, 2 D)
    decoder: Callable[..., nn.Module]  # (shape, widths, latent_dim, **options) -> z (B, D) to x_logits
    default_widths: tuple[int, ...]  # model.widths when the config leaves it out
    # ModelConfig fields the builders take besides widths and latent_dim, with their defaults: an int
    # (a count, >= 0) or a str (a key of CHOICES).
    options: dict[str, int | str] = field(default_factory=dict)
    # ModelConfig fields whose value the architecture fixes, and the one to use to change them.
    fixed: dict[str, Any] = field(default_factory=dict)
    unfixed: str | None = None
    shape_problem: Callable[[Shape, tuple[int, ...]], str | None] = lambda shape, widths: None  # None: it fits


CHOICES: dict[str, tuple[str, ...]] = {"norm": tuple(NORMS)}  # the values of the options that are names
REFERENCE_WIDTHS = (32, 64, 128)
ARCHITECTURES: dict[str, Architecture] = {
    # The brief's design, what every benchmark compares: conv widths 32-64-128, 16 latent dimensions.
    "reference": Architecture(conv_encoder, conv_decoder, REFERENCE_WIDTHS,
                              fixed={"latent_dim": 16, "widths": REFERENCE_WIDTHS}, unfixed="conv",
                              shape_problem=strided_shape_problem),
    "conv": Architecture(conv_encoder, conv_decoder, REFERENCE_WIDTHS, shape_problem=strided_shape_problem),
    "mlp": Architecture(mlp_encoder, mlp_decoder, (512, 256)),
    "resnet": Architecture(resnet_encoder, resnet_decoder, REFERENCE_WIDTHS, options={"blocks": 1, "norm": "batch"},
                           shape_problem=resnet_shape_problem),
}


class VAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), p(x|z) from the decoder's logits."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, log_sigma: float, learn_sigma: bool):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        # ln sigma of a Gaussian likelihood (unused by Bernoulli ones); a parameter only if learned.
        value = torch.tensor(float(log_sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(value)
        else:
            self.register_buffer("log_sigma", value)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, D) each
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # x_logits (B, C, H, W)

    def decode_mean(self, z: Tensor) -> Tensor:
        """The expected image E[x|z] = sigmoid(x_logits), in [0, 1], under every likelihood here."""
        return torch.sigmoid(self.decode(z))

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reparameterised pass: z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) unless given."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mu, logvar, z


def build_model(model: Any, objective: Any, shape: Shape) -> VAE:
    """The VAE that `model` (a config.ModelConfig, validated) and `objective` (a
    config.ObjectiveConfig) describe for images of `shape`; one line if the architecture cannot
    take that shape. (The configs are not imported: config.py asks this module's registry.)"""
    arch = ARCHITECTURES[model.arch]
    widths = model.resolved_widths
    if problem := arch.shape_problem(shape, widths):
        raise BdvaeError(f"model.arch={model.arch!r} {problem}")
    options = {name: default if getattr(model, name) is None else getattr(model, name)
               for name, default in arch.options.items()}
    likelihood = LIKELIHOODS[objective.likelihood]
    return VAE(arch.encoder(shape, widths, model.latent_dim, **options), arch.decoder(shape, widths, model.latent_dim, **options),
               log_sigma=math.log(objective.sigma), learn_sigma=likelihood.learn_sigma)


def parameter_bytes(model: Any, objective: Any, shape: Shape) -> int:
    """The bytes of build_model(model, objective, shape)'s weights, counted on the meta device, where
    modules of any size are built without allocating their memory."""
    with torch.device("meta"):
        vae = build_model(model, objective, shape)
    return sum(p.numel() * p.element_size() for p in vae.parameters())


@torch.no_grad()
def activation_bytes(module: nn.Module, x: Tensor) -> int:
    """The bytes of every layer's output in one forward pass of `x` (one image or latent, say)
    through `module`: a lower bound of what a pass keeps for its backward. The pass runs in eval
    mode, so that a BatchNorm's running statistics stay as they were."""
    total = 0
    was_training = module.training

    def add(_: nn.Module, __: Any, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * out.element_size()

    hooks = [m.register_forward_hook(add) for m in module.modules() if not list(m.children())]
    try:
        module.eval()(x)
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
