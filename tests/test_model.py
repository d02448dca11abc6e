"""Architectures: the reference layers, shapes for other image sizes, the MLP and residual variants."""

import copy

import pytest
import torch
from torch import nn

from bdvae.config import ModelConfig, ObjectiveConfig
from bdvae.errors import BdvaeError
from bdvae.kernels import ContiguousGroupNorm, ImageConvTranspose2d
from bdvae.model import ARCHITECTURES, NORMS, ResidualBlock, build_model, group_norm
from bdvae.objective import loss_terms


def _layers(module):
    return [(type(m).__name__, getattr(m, "in_channels", getattr(m, "in_features", None)),
             getattr(m, "out_channels", getattr(m, "out_features", None))) for m in module
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def test_reference_architecture_is_the_briefs():
    model = build_model(ModelConfig(arch="reference"), ObjectiveConfig(), (1, 32, 32))
    assert _layers(model.encoder) == [("Conv2d", 1, 32), ("Conv2d", 32, 64), ("Conv2d", 64, 128), ("Linear", 2048, 32)]
    assert _layers(model.decoder) == [("Linear", 16, 2048), ("ConvTranspose2d", 128, 64),
                                      ("ConvTranspose2d", 64, 32), ("ImageConvTranspose2d", 32, 1)]  # a ConvTranspose2d
    for m in list(model.encoder) + list(model.decoder):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            assert (m.kernel_size, m.stride, m.padding) == ((4, 4), (2, 2), (1, 1))
    assert not isinstance(list(model.decoder)[-1], nn.ReLU)  # the decoder ends in logits


@pytest.mark.parametrize("arch,widths,shape", [
    ("conv", (16, 32), (3, 24, 40)),
    ("conv", (8, 16, 32, 64), (1, 64, 64)),
    ("mlp", (64,), (3, 10, 14)),
    ("resnet", (8, 16), (1, 28, 28)),
    ("resnet", (8, 16, 32), (3, 32, 32)),
    ("resnet", (4, 8, 16, 32), (3, 48, 64)),
    ("resnet", (8,), (2, 6, 10)),
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


def _count(*layers: tuple[str, int, int]) -> int:
    """Parameters of conv/linear layers (kind, in, out) and of BatchNorms (kind "bn", width)."""
    total = 0
    for kind, *sizes in layers:
        if kind == "bn":
            total += 2 * sizes[0]  # scale and shift
        else:
            c_in, c_out, taps, bias = sizes
            total += c_in * c_out * taps + (c_out if bias else 0)
    return total


def test_resnet_parameter_count_of_the_quality_preset():
    # The quality preset's model on 1 x 32 x 32 images: widths 32-64-128, one residual block per
    # resolution, 32 latent dimensions. 1,302,209 parameters (docs/presets.md states it).
    model = build_model(ModelConfig(arch="resnet", widths=(32, 64, 128), blocks=1, latent_dim=32), ObjectiveConfig(),
                        (1, 32, 32))
    block = lambda w: [("conv", w, w, 9, False), ("bn", w), ("conv", w, w, 9, False), ("bn", w)]  # noqa: E731
    encoder = [("conv", 1, 32, 16, False), ("bn", 32), *block(32), ("conv", 32, 64, 16, False), ("bn", 64), *block(64),
               ("conv", 64, 128, 16, False), ("bn", 128), *block(128), ("linear", 128 * 4 * 4, 64, 1, True)]
    decoder = [("linear", 32, 128 * 4 * 4, 1, False), ("bn", 128), *block(128), ("conv", 128, 64, 16, False), ("bn", 64),
               *block(64), ("conv", 64, 32, 16, False), ("bn", 32), *block(32), ("conv", 32, 1, 16, True)]
    assert sum(p.numel() for p in model.encoder.parameters()) == _count(*encoder)
    assert sum(p.numel() for p in model.decoder.parameters()) == _count(*decoder)
    assert sum(p.numel() for p in model.parameters()) == 1_302_209


@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_resnet_blocks_per_resolution(blocks):
    model = build_model(ModelConfig(arch="resnet", widths=(8, 16), blocks=blocks, latent_dim=4), ObjectiveConfig(),
                        (1, 16, 16))
    for half in (model.encoder, model.decoder):
        assert sum(isinstance(m, ResidualBlock) for m in half) == 2 * blocks
    assert isinstance(list(model.decoder)[-1], nn.ConvTranspose2d)  # logits: no BatchNorm, no ReLU after them


def test_residual_block_starts_as_the_identity_after_relu():
    # The second BatchNorm's scale starts at zero, so a fresh block is ReLU(x): deep stacks start tame.
    torch.manual_seed(0)
    block = ResidualBlock(6).train()
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_resnet_trains_on_a_batch_of_one_image():
    # A last batch of 1 image must not stop training: every BatchNorm sees more than one pixel.
    model = build_model(ModelConfig(arch="resnet", widths=(8, 16), latent_dim=4), ObjectiveConfig(), (1, 8, 8)).train()
    x_logits, *_ = model(torch.rand(1, 1, 8, 8))
    x_logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm", list(NORMS))
def test_resnet_norms_keep_the_parameters_and_the_identity_start(norm):
    # The quality preset's model has 1,302,209 parameters whatever its normalisation (a scale and a
    # shift per channel either way), and a fresh residual block is ReLU(x) with either.
    model = build_model(ModelConfig(arch="resnet", widths=(32, 64, 128), blocks=1, latent_dim=32, norm=norm),
                        ObjectiveConfig(), (1, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 1_302_209
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}
    assert kinds == {nn.BatchNorm2d if norm == "batch" else ContiguousGroupNorm}
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(ResidualBlock(6, norm).train()(x), torch.relu(x))


def test_group_norm_encodes_each_image_as_it_would_alone():
    """In training mode a BatchNorm model's posterior for an image depends on the rest of its batch
    (what a batch-level term like objective.aggregate can lean on); a GroupNorm model's does not, and
    it computes the same function in training and evaluation."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 16, 16)
    for norm, alone in [("batch", False), ("group", True)]:
        model = build_model(ModelConfig(arch="resnet", widths=(8, 16), latent_dim=4, norm=norm), ObjectiveConfig(),
                            (1, 16, 16)).train()
        with torch.no_grad():
            together, by_itself = model.encode(x)[0][:2], model.encode(x[:2])[0]
            evaluated = model.eval().encode(x)[0][:2]
        assert torch.allclose(together, by_itself, atol=1e-5) is alone
        assert torch.allclose(together, evaluated, atol=1e-5) is alone


def test_group_norm_groups_divide_any_width():
    assert [group_norm(w).num_groups for w in (32, 12, 7)] == [8, 4, 1]


def test_resnet_refuses_images_too_small_for_its_batchnorms():
    with pytest.raises(BdvaeError, match="needs images larger than 4x4"):
        build_model(ModelConfig(arch="resnet", widths=(8, 16), latent_dim=4), ObjectiveConfig(), (1, 4, 4))


def test_model_blocks_only_for_resnet():
    with pytest.raises(BdvaeError, match="model.blocks applies to model.arch='resnet' only"):
        ModelConfig(arch="conv", blocks=2)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_builds_from_its_registry_entry(name):
    """What the registry says of an architecture is what the config and build_model do with it:
    its default widths, its options, its fixed values and the shapes it takes."""
    entry = ARCHITECTURES[name]
    config = ModelConfig(arch=name, latent_dim=entry.fixed.get("latent_dim", 6))
    assert config.resolved_widths == entry.default_widths
    model = build_model(config, ObjectiveConfig(), (1, 32, 32))
    x_logits, mu, _, _ = model(torch.rand(2, 1, 32, 32))
    assert x_logits.shape == (2, 1, 32, 32) and mu.shape == (2, config.latent_dim)
    for option in sorted({o for e in ARCHITECTURES.values() for o in e.options}):  # only those declaring it take it
        if option in entry.options:
            assert getattr(ModelConfig(arch=name, **{option: entry.options[option]}), option) == entry.options[option]
        else:
            value = next(e.options[option] for e in ARCHITECTURES.values() if option in e.options)  # of its type
            with pytest.raises(BdvaeError, match=f"model.{option} applies to"):
                ModelConfig(arch=name, **{option: value})
    odd = (1, 30, 30)  # not divisible by 2 per stride-2 layer
    if entry.shape_problem(odd, entry.default_widths) is None:
        assert build_model(config, ObjectiveConfig(), odd)(torch.rand(1, *odd))[0].shape == (1, *odd)
    else:
        with pytest.raises(BdvaeError, match=f"model.arch={name!r} with"):
            build_model(config, ObjectiveConfig(), odd)


@pytest.mark.parametrize("c_out, size", [(1, 16), (3, 8), (2, 5)])
def test_the_image_layer_computes_the_plain_transposed_convolution(c_out, size, monkeypatch):
    """Its GEMM + col2im form equals nn.ConvTranspose2d in float64: outputs and every gradient."""
    torch.manual_seed(0)
    layer = ImageConvTranspose2d(8, c_out, 4, 2, 1).double()
    plain = nn.ConvTranspose2d(8, c_out, 4, 2, 1).double()
    plain.load_state_dict(layer.state_dict())  # the same parameter names and shapes
    x = torch.randn(3, 8, size, size, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    y_plain = plain(x_plain)
    monkeypatch.setattr(nn.ConvTranspose2d, "forward", lambda *a: pytest.fail("took the plain layer's path"))
    y = layer(x)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_plain.backward(g)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=0, atol=1e-12)
    for p, q in zip(layer.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_contiguous_group_norm_computes_the_plain_layer_and_keeps_the_layout(dtype, monkeypatch):
    """bf16 channels-last: normalised in the usual layout (the plain layer's code is not run), given
    back channels-last, equal to the plain layer up to bf16 rounding, outputs and every gradient;
    fp32: the plain layer's own path."""
    torch.manual_seed(0)
    layer = ContiguousGroupNorm(4, 16)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    plain = nn.GroupNorm(4, 16)
    plain.load_state_dict(layer.state_dict())  # the same parameter names and shapes
    x = torch.randn(3, 16, 8, 8).to(dtype=dtype, memory_format=torch.channels_last).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    y_plain = plain(x_plain)
    if dtype == torch.bfloat16:
        monkeypatch.setattr(nn.GroupNorm, "forward", lambda *a: pytest.fail("took the plain layer's path"))
    y = layer(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 0.02, "atol": 0.02} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(y, y_plain, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_plain.backward(g)
    torch.testing.assert_close(x.grad, x_plain.grad, **tol)
    for p, q in zip(layer.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0.02, atol=0.2 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("arch", ["reference", "resnet"])
def test_the_decoders_give_the_image_by_the_image_layer_with_plain_weights(arch):
    model = build_model(ModelConfig(arch=arch), ObjectiveConfig(), (1, 32, 32))
    last = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    assert type(last) is ImageConvTranspose2d and last.out_channels == 1
    assert sum(isinstance(m, ImageConvTranspose2d) for m in model.modules()) == 1  # only the image layer
    assert set(last.state_dict()) == set(nn.ConvTranspose2d(last.in_channels, 1, 4).state_dict())


def test_in_place_relus_give_the_same_gradients_bit_for_bit():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), ObjectiveConfig(), (1, 32, 32))
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x, eps = torch.rand(4, 1, 32, 32), torch.randn(4, 16)
    grads = [torch.autograd.grad(loss_terms(m, x, ObjectiveConfig(), eps).loss, list(m.parameters())) for m in (model, plain)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
