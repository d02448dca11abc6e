"""CPU kernels: layers rewritten to compute the same function faster on a CPU, where oneDNN's
kernels vectorize over output channels and a layer with few of them (the one that gives the image)
runs at a few percent of its speed (docs/results/performance.md). Each falls back to the plain
computation elsewhere (a GPU, bf16 autocast). The training model uses ImageConvTranspose2d; the
IWAE's many decodes use iwae_decoder's copy of the decoder. This module imports nothing of bdvae.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class ContiguousGroupNorm(nn.GroupNorm):
    """GroupNorm that, on a CPU, normalises a channels-last bf16 or fp16 input in the usual layout
    and gives it back channels-last: the same function as the plain layer, with the same parameters
    and state dict. The CPU's channels-last kernel in reduced precision runs at a fraction of the
    usual layout's speed, which the two copies cost far less than (docs/results/performance.md).
    Elsewhere (fp32, a GPU, the usual layout) the plain layer's computation."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 4
                or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)


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


def iwae_decoder(model: nn.Module) -> nn.Module:
    """The decoder of `model` (a model.VAE) rebuilt for the IWAE's many decodes, computing the same function (what
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
