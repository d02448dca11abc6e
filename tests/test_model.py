"""Architectures: the reference layers, shapes for other image sizes, and the MLP variant."""

import pytest
import torch
from torch import nn

from bdvae.config import ModelConfig, ObjectiveConfig
from bdvae.errors import BdvaeError
from bdvae.model import build_model


def _layers(module):
    return [(type(m).__name__, getattr(m, "in_channels", getattr(m, "in_features", None)),
             getattr(m, "out_channels", getattr(m, "out_features", None))) for m in module
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def test_reference_architecture_is_the_briefs():
    model = build_model(ModelConfig(arch="reference"), ObjectiveConfig(), (1, 32, 32))
    assert _layers(model.encoder) == [("Conv2d", 1, 32), ("Conv2d", 32, 64), ("Conv2d", 64, 128), ("Linear", 2048, 32)]
    assert _layers(model.decoder) == [("Linear", 16, 2048), ("ConvTranspose2d", 128, 64),
                                      ("ConvTranspose2d", 64, 32), ("ConvTranspose2d", 32, 1)]
    for m in list(model.encoder) + list(model.decoder):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            assert (m.kernel_size, m.stride, m.padding) == ((4, 4), (2, 2), (1, 1))
    assert not isinstance(list(model.decoder)[-1], nn.ReLU)  # the decoder ends in logits


@pytest.mark.parametrize("arch,widths,shape", [
    ("conv", (16, 32), (3, 24, 40)),
    ("conv", (8, 16, 32, 64), (1, 64, 64)),
    ("mlp", (64,), (3, 10, 14)),
])
def test_shapes_follow_the_data(arch, widths, shape):
    model = build_model(ModelConfig(arch=arch, widths=widths, latent_dim=5), ObjectiveConfig(), shape)
    x = torch.rand(4, *shape)
    x_logits, mu, logvar, z = model(x)
    assert x_logits.shape == x.shape
    assert mu.shape == logvar.shape == z.shape == (4, 5)


def test_conv_needs_divisible_sizes():
    with pytest.raises(BdvaeError, match="divisible by 8"):
        build_model(ModelConfig(), ObjectiveConfig(), (1, 28, 28))
