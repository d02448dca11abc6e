"""Encoder, decoder and VAE modules: no losses, no I/O.

The encoder maps x (B, C, H, W) to the posterior parameters mu, logvar (B, D); the decoder maps
z (B, D) to x_logits (B, C, H, W). Each architecture is an entry of ``ARCHITECTURES`` that carries
what the rest of bdvae asks of it: its builders, default widths, the options and fixed values it
takes from the config, and the image shapes it accepts. ``build_model`` turns a config into modules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdvae.errors import BdvaeError
from bdvae.likelihoods import LIKELIHOODS

Shape = tuple[int, int, int]  # (C, H, W)


def relu() -> nn.ReLU:
    """ReLU in place: the layer before it keeps no use for its output, so autograd allows it (and
    would raise if it did not), and a training step allocates and writes one tensor fewer per ReLU
    (docs/results/performance.md). The same values and gradients, bit for bit."""
    return nn.ReLU(inplace=True)


class ImageConvTranspose2d(nn.ConvTranspose2d):
    """The transposed convolution that gives the image, computed on the CPU (fp32, float64) as one
    GEMM of the input pixels to k x k patches of the output, (B, H W, C_in) @ (C_in, C_out k k), and
    col2im (F.fold) adding the overlapping patches up: the same function as the plain layer (the sums
    in another order), with the same parameters and state dict. oneDNN's kernels vectorize over output
    channels, which 1 or 3 image channels leave mostly idle (docs/results/performance.md). Elsewhere (a GPU,
    bf16 autocast, a dilated or grouped layer) the plain layer's computation."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        plain = (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or output_size is not None
                 or torch.is_autocast_enabled("cpu") or self.groups != 1 or self.dilation != (1, 1)
                 or self.output_padding != (0, 0))
        if plain:
            return super().forward(x, output_size)
        b, c_in, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        patches = x.permute(0, 2, 3, 1).reshape(b, h * w, c_in) @ self.weight.reshape(c_in, -1)  # (B, H W, C_out kh kw)
        size = ((h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw)
        y = F.fold(patches.transpose(1, 2), size, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (B, C_out, H', W')
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


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


class ResidualBlock(nn.Module):
    """x -> ReLU(x + BN(Conv3x3(ReLU(BN(Conv3x3(x)))))): the basic block of He et al. 2016, its
    second BatchNorm's scale starting at zero so that each block starts as the identity (Goyal et
    al. 2017). The convolutions have no bias (the BatchNorm after each has one)."""

    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), relu(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        nn.init.zeros_(self.branch[-1].weight)
        self.out = relu()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + self.branch(x))


def resnet_encoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int,
                   blocks: int = 1) -> nn.Sequential:
    """The conv encoder with BatchNorm after each stride-2 convolution and `blocks` residual
    blocks at each resolution: per width Conv(k4, s2, p1)-BN-ReLU-ResidualBlock x blocks, then
    Linear(-> 2 D)."""
    c, h, w = shape
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), relu()]
        layers += [ResidualBlock(width) for _ in range(blocks)]
        c = width
    scale = 2 ** len(widths)
    layers += [nn.Flatten(), nn.Linear(c * (h // scale) * (w // scale), 2 * latent_dim)]
    return nn.Sequential(*layers)


def resnet_decoder(shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int,
                   blocks: int = 1) -> nn.Sequential:
    """The encoder's mirror: Linear(D ->)-BN-ReLU, then per width in reverse ResidualBlock x blocks
    and ConvTranspose(k4, s2, p1), each but the last (which gives the logits) followed by BN-ReLU."""
    c, h, w = shape
    scale = 2 ** len(widths)
    hidden = (widths[-1], h // scale, w // scale)
    layers: list[nn.Module] = [nn.Linear(latent_dim, math.prod(hidden), bias=False), nn.Unflatten(1, hidden),
                               nn.BatchNorm2d(widths[-1]), relu()]
    outs = list(reversed(widths[:-1])) + [c]
    for c_in, c_out in zip(reversed(widths), outs):
        layers += [ResidualBlock(c_in) for _ in range(blocks)]
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), relu()]
    layers[-3] = ImageConvTranspose2d(widths[0], c, 4, 2, 1)  # the logits: a bias, no BN, no ReLU
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
    needs more than one value per channel, even from a batch of 1."""
    scale = 2 ** len(widths)
    if problem := strided_shape_problem(shape, widths):
        return problem
    if shape[1] * shape[2] < 2 * scale * scale:
        return (f"with {len(widths)} stride-2 layers needs images larger than {scale}x{scale} (its BatchNorms need "
                f"more than one pixel at the lowest resolution), got {shape[1]}x{shape[2]}")
    return None


@dataclass(frozen=True)
class Architecture:
    """An entry of ARCHITECTURES: what builds the encoder and the decoder, and what they take."""

    encoder: Callable[..., nn.Module]  # (shape, widths, latent_dim, **options) -> x (B, C, H, W) to (B, 2 D)
    decoder: Callable[..., nn.Module]  # (shape, widths, latent_dim, **options) -> z (B, D) to x_logits
    default_widths: tuple[int, ...]  # model.widths when the config leaves it out
    # ModelConfig fields the builders take besides widths and latent_dim, with their defaults.
    options: dict[str, int] = field(default_factory=dict)
    # ModelConfig fields whose value the architecture fixes, and the one to use to change them.
    fixed: dict[str, Any] = field(default_factory=dict)
    unfixed: str | None = None
    shape_problem: Callable[[Shape, tuple[int, ...]], str | None] = lambda shape, widths: None  # None: it fits


REFERENCE_WIDTHS = (32, 64, 128)
ARCHITECTURES: dict[str, Architecture] = {
    # The brief's design, what every benchmark compares: conv widths 32-64-128, 16 latent dimensions.
    "reference": Architecture(conv_encoder, conv_decoder, REFERENCE_WIDTHS,
                              fixed={"latent_dim": 16, "widths": REFERENCE_WIDTHS}, unfixed="conv",
                              shape_problem=strided_shape_problem),
    "conv": Architecture(conv_encoder, conv_decoder, REFERENCE_WIDTHS, shape_problem=strided_shape_problem),
    "mlp": Architecture(mlp_encoder, mlp_decoder, (512, 256)),
    "resnet": Architecture(resnet_encoder, resnet_decoder, REFERENCE_WIDTHS, options={"blocks": 1},
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

# ---------------------------------------------------------------------------------------------
# The decoder rewritten for the IWAE's many decodes


def has_subpixel_form(module: nn.Module) -> bool:
    """Whether `module` is a transposed convolution that subpixel_convolution can rewrite: the
    kernel 4, stride 2, padding 1 of every conv decoder here."""
    return (isinstance(module, nn.ConvTranspose2d) and module.kernel_size == (4, 4) and module.stride == (2, 2)
            and module.padding == (1, 1) and module.output_padding == (0, 0) and module.dilation == (1, 1)
            and module.groups == 1)


# Of a ConvTranspose2d(k4, s2, p1): output phase a (rows 2m + a) -> its (input offset dy, kernel tap
# ky) pairs, input row m + dy through tap ky; the same for columns.
_PHASE_TAPS = {0: ((0, 1), (-1, 3)), 1: ((1, 0), (0, 2))}


def subpixel_weight(weight: Tensor) -> Tensor:
    """The 3x3 kernel (4 C_out, C_in, 3, 3) of subpixel_convolution from a ConvTranspose2d's 4x4
    kernel (C_in, C_out, 4, 4), as a differentiable function of it.

    Output pixel (2m + a, 2n + b) of the transposed convolution sums input pixels (m + dy, n + dx)
    times kernel taps (ky, kx): for a = 0, dy = 0 with ky = 1 and dy = -1 with ky = 3; for a = 1,
    dy = 1 with ky = 0 and dy = 0 with ky = 2 (the same for columns). Each of the 4 output phases
    is thus a convolution with 4 of the 9 taps of a 3x3 window; PixelShuffle(2) interleaves the
    phases, output channel c of phase (a, b) being conv channel 4c + 2a + b.
    """
    c_in, c_out = weight.shape[:2]
    kernel = weight.new_zeros(c_out, 2, 2, c_in, 3, 3)
    for a in (0, 1):
        for b in (0, 1):
            for dy, ky in _PHASE_TAPS[a]:
                for dx, kx in _PHASE_TAPS[b]:
                    kernel[:, a, b, :, dy + 1, dx + 1] = weight[:, :, ky, kx].T
    return kernel.reshape(4 * c_out, c_in, 3, 3)


def subpixel_convolution(deconv: nn.ConvTranspose2d) -> nn.Sequential:
    """The same map as `deconv`, a ConvTranspose2d(kernel 4, stride 2, padding 1), as a 3x3
    convolution to 4x the channels (subpixel_weight) followed by a pixel shuffle (Shi et al. 2016,
    "Is the deconvolution layer the same as a convolutional layer?")."""
    if not has_subpixel_form(deconv):
        raise ValueError(f"subpixel_convolution handles ConvTranspose2d(k=4, s=2, p=1) only, got {deconv}")
    c_in, c_out = deconv.in_channels, deconv.out_channels
    conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1, bias=deconv.bias is not None,
                     dtype=deconv.weight.dtype, device=deconv.weight.device)
    with torch.no_grad():
        conv.weight.copy_(subpixel_weight(deconv.weight))
        if deconv.bias is not None:
            conv.bias.copy_(deconv.bias.repeat_interleave(4))
    return nn.Sequential(conv, nn.PixelShuffle(2))


def _shifted(d: int, n: int) -> tuple[slice, slice]:
    """(source, destination) slices of a length-n axis for out[m] += src[m + d], d in {-1, 0, 1}."""
    return slice(max(d, 0), n + min(d, 0)), slice(max(-d, 0), n - max(d, 0))


class TapSumConvTranspose2d(nn.Module):
    """A ConvTranspose2d(kernel 4, stride 2, padding 1) to a few channels (the image layer) for
    inference, computing the same function. On the CPU in fp32 or float64: one GEMM of the input
    pixels to the 16 kernel taps, (16 C_out, C_in) @ (C_in, B H W), then each of the 4 output phases
    as the sum of its 4 tap planes, shifted by at most a pixel (_PHASE_TAPS), and the phases
    interleaved, which a CPU runs faster than the sub-pixel convolution (oneDNN vectorizes over
    output channels, which 4 leave mostly idle; docs/results/performance.md). Under bf16 autocast or on a GPU, the sub-pixel convolution, which
    their kernels run well."""

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.subpixel = subpixel_convolution(deconv)  # checks the form
        c_in, c_out = deconv.in_channels, deconv.out_channels
        # rows (c_out, ky, kx)
        self.register_buffer("taps", deconv.weight.detach().permute(1, 2, 3, 0).reshape(c_out * 16, c_in).clone())
        self.register_buffer("bias", None if deconv.bias is None else deconv.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
            return self.subpixel(x)
        n, c_in, h, w = x.shape
        planes = (self.taps @ x.permute(0, 2, 3, 1).reshape(-1, c_in).T).view(-1, 4, 4, n, h, w)  # (C_out, ky, kx, B, H, W)
        phases = x.new_empty(2, 2, planes.shape[0], n, h, w)
        for a in (0, 1):
            for b in (0, 1):
                out = phases[a, b]
                # the tap at offset (0, 0) covers every pixel of the phase: the sum starts from it
                (_, ky, _, kx), *shifted = sorted(((dy, ky, dx, kx) for dy, ky in _PHASE_TAPS[a] for dx, kx in _PHASE_TAPS[b]),
                                                  key=lambda tap: tap[0] != 0 or tap[2] != 0)
                out.copy_(planes[:, ky, kx])
                for dy, ky, dx, kx in shifted:
                    (src_y, dst_y), (src_x, dst_x) = _shifted(dy, h), _shifted(dx, w)
                    out[:, :, dst_y, dst_x] += planes[:, ky, kx, :, src_y, src_x]
        y = phases.permute(3, 2, 4, 0, 5, 1).reshape(n, -1, 2 * h, 2 * w)  # pixel (2m + a, 2l + b) from phase (a, b)
        return y if self.bias is None else y.add_(self.bias.view(1, -1, 1, 1))


def iwae_decoder(model: VAE) -> nn.Module:
    """The model's decoder rebuilt for the IWAE's many decodes, computing the same function (what
    each step gains: docs/results/performance.md). A copy, so that the run's model is left as it was:
    - in channels-last layout, where oneDNN's convolutions need no layout reorders;
    - each transposed convolution to at most 4 channels (the one producing the image) as tap sums
      (TapSumConvTranspose2d; in sub-pixel form under bf16 autocast and on a GPU): oneDNN runs a
      deconvolution with so few output channels at a few percent of its speed;
    - ReLUs in place (as the model's own are).
    In fp32 the logits differ from the model's by rounding only (another summation order)."""
    decoder = copy.deepcopy(model.decoder)
    for name, module in list(decoder.named_modules()):
        if has_subpixel_form(module) and module.out_channels <= 4:
            parent, _, child = name.rpartition(".")  # (nn.Module.set_submodule needs torch 2.5)
            setattr(decoder.get_submodule(parent), child, TapSumConvTranspose2d(module))
        elif isinstance(module, nn.ReLU):
            module.inplace = True
    return decoder.to(memory_format=torch.channels_last)
