"""Config: TOML round trip, overrides, and one-line errors for unknown keys and invalid values."""

import dataclasses
import importlib
import re
import tomllib

import pytest

from bdvae import config as config_lib
from bdvae.config import Config, DataConfig, ModelConfig, ObjectiveConfig, TrainConfig
from bdvae.errors import BdvaeError


def test_toml_round_trip(tmp_path):
    original = Config(data=DataConfig(train_size=100, pad=0), model=ModelConfig(arch="conv", widths=(8, 16), latent_dim=3),
                      objective=ObjectiveConfig(regularizer="kl", beta=0.5), train=TrainConfig(epochs=2, seed=7))
    path = tmp_path / "c.toml"
    path.write_text(config_lib.dumps(original))
    assert config_lib.load(path) == original


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 3\nlr = 0.01\n")
    config = config_lib.load(path, ["train.epochs=5", "objective.regularizer=kl", "model.widths=[4, 8]",
                                    "model.arch='conv'", "objective.beta=2"])
    assert config.train.epochs == 5 and config.train.lr == 0.01
    assert config.objective.regularizer == "kl" and config.objective.beta == 2.0
    assert config.model.widths == (4, 8)


@pytest.mark.parametrize("overrides,message", [
    (["objective.regularizer=jensen_shannon"], "objective.regularizer must be one of bhattacharyya, kl, hellinger"),
    (["objective.alpha=1"], "objective.alpha must be positive, finite and not 1"),
    (["objective.warmup_steps=-1"], "objective.warmup_steps must be >= 0"),
    (["train.epochs=0"], "train.epochs must be positive"),
    (["train.batch_size=-4"], "train.batch_size must be positive"),
    (["objective.beta=-1"], "objective.beta must be >= 0"),
    (["objective.beta=inf"], "objective.beta must be >= 0 and finite"),
    (["train.lr=nan"], "train.lr must be positive"),
    (["train.epoch=3"], "unknown key train.epoch (did you mean train.epochs?); valid: epochs, batch_size"),
    (["optim.lr=3"], "unknown config section 'optim'"),
    (["train.epochs=two"], "train.epochs must be an integer"),
    (["train.epochs=2.5"], "train.epochs must be an integer"),
    (["model.latent_dim=8"], "model.arch='reference' fixes latent_dim=16"),
    (["model.arch=conv", "model.widths=[]"], "model.widths must not be empty"),
    (["data.name=npz"], "data.name='npz' needs data.path"),
    (["trainepochs=3"], "--set expects section.key=value"),
])
def test_invalid_values_are_one_line_errors(overrides, message):
    with pytest.raises(BdvaeError) as err:
        config_lib.load(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_broken_toml_is_reported_with_its_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\nepochs = 3")
    with pytest.raises(BdvaeError, match="bad.toml is not valid TOML"):
        config_lib.load(path)


def test_configs_are_frozen():
    config = Config()
    with pytest.raises(AttributeError):
        config.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", config_lib.preset_names())
def test_every_shipped_preset_is_a_valid_config(name):
    config = config_lib.load(preset=name)
    assert isinstance(config, Config)
    assert config_lib.load(preset=name) == config_lib.from_dict(tomllib.loads(config_lib.preset_text(name)))


def test_the_presets_are_reference_and_quality():
    assert {"reference", "quality"} <= set(config_lib.preset_names())
    assert config_lib.load(preset="reference") == Config()  # the defaults: every earlier figure still holds
    quality = config_lib.load(preset="quality")
    assert quality.model.arch == "resnet" and quality.objective.likelihood == "bernoulli_binarized"
    assert quality.train.lr_schedule == "cosine"


def test_set_and_a_config_file_apply_on_top_of_a_preset(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbatch_size = 64\n[objective]\nregularizer = \"kl\"\n")
    quality = config_lib.load(preset="quality")
    config = config_lib.load(path, ["train.epochs=2", "model.latent_dim=8"], preset="quality")
    assert config.train.epochs == 2 and config.model.latent_dim == 8  # --set wins over the preset
    assert config.train.batch_size == 64 and config.objective.regularizer == "kl"  # the file's keys replace the preset's
    # ... and the preset's other keys of the same sections stay
    assert config.train.lr_schedule == quality.train.lr_schedule == "cosine"
    assert config.objective.likelihood == quality.objective.likelihood == "bernoulli_binarized"
    assert config.model.arch == "resnet" and config.model.widths == quality.model.widths


def test_an_unknown_preset_is_a_one_line_error_naming_the_valid_ones():
    with pytest.raises(BdvaeError) as err:
        config_lib.load(preset="qualty")
    assert str(err.value) == f"unknown preset 'qualty'; valid: {', '.join(config_lib.preset_names())}"


@pytest.mark.parametrize("overrides,message", [
    (["train.lr_schedule=linear"], "train.lr_schedule must be one of constant, cosine"),
    (["model.arch=resnet", "model.blocks=-1"], "model.blocks applies to model.arch='resnet' only and must be >= 0"),
    (["model.norm=group"], "model.norm applies to model.arch='resnet' only, got 'group'"),
    (["model.arch=resnet", "model.norm=grup"], "model.norm must be one of batch, group, got 'grup' .did you mean group"),
])
def test_new_fields_are_validated(overrides, message):
    with pytest.raises(BdvaeError, match=message):
        config_lib.load(None, overrides)


def test_every_key_has_its_meaning_written_beside_its_field():
    meanings = config_lib.meanings()
    keys = [f"{s}.{f.name}" for s, cls in config_lib.SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted(meanings) == sorted(keys)
    assert all(len(text) > 10 and "  " not in text for text in meanings.values())
    assert meanings["train.checkpoint_every"].startswith("Optimizer steps between saved training states")


@pytest.mark.parametrize("key,registry", [
    ("data.name", "bdvae.data:DATASETS"), ("model.arch", "bdvae.model:ARCHITECTURES"),
    ("objective.likelihood", "bdvae.likelihoods:LIKELIHOODS"), ("objective.regularizer", "bdvae.regularizers:REGULARIZERS"),
    ("train.lr_schedule", "bdvae.config:LR_SCHEDULES")])
def test_a_meaning_that_lists_choices_names_every_entry_of_its_registry(key, registry):
    module, name = registry.split(":")
    choices = getattr(importlib.import_module(module), name)
    assert choices and all(re.search(rf"\b{choice}\b", config_lib.meanings()[key]) for choice in choices), key


@pytest.mark.parametrize("preset", [None, *config_lib.preset_names()])
def test_show_gives_back_the_config_with_every_key_its_default_and_meaning(preset):
    config = config_lib.load(None, ["objective.beta=2", "data.train_size=100"], preset=preset)
    text = config_lib.show(config, preset=preset)
    assert config_lib.from_dict(tomllib.loads(text)) == config  # valid TOML, --config takes it back
    flat_text = " ".join(line.lstrip("# ").strip() for line in text.splitlines())
    for key, meaning in config_lib.meanings().items():
        assert meaning in flat_text, key
    assert "\nbeta = 2.0\n" in text and "[default: 1.0]" in text
    assert "\ntrain_size = 100\n" in text and "\n# test_size =  (unset)\n" in text  # unset: commented out
    assert "\nwidths = [32, 64, 128]\n" in text if preset == "quality" else "\n# widths =  (unset)\n" in text


@pytest.mark.parametrize("overrides,message", [
    (["train.epohcs=3"], "unknown key train.epohcs (did you mean train.epochs?)"),
    (["trian.epochs=3"], "unknown config section 'trian' (did you mean train?)"),
    (["objective.regularizer=bhattacharya"], "got 'bhattacharya' (did you mean bhattacharyya?)"),
    (["data.name=mnsit"], "got 'mnsit' (did you mean mnist?)"),
    (["model.arch=resent"], "got 'resent' (did you mean resnet?)"),
    (["train.lr_schedule=cosin"], "got 'cosin' (did you mean cosine?)"),
])
def test_a_misspelt_key_or_value_suggests_the_nearest(overrides, message):
    with pytest.raises(BdvaeError, match=re.escape(message)):
        config_lib.load(None, overrides)


def test_a_value_near_no_choice_suggests_nothing():
    with pytest.raises(BdvaeError) as e:
        config_lib.load(None, ["objective.regularizer=zzz"])
    assert str(e.value).endswith("got 'zzz'") and "did you mean" not in str(e.value)


def test_a_config_built_in_python_is_type_checked_as_a_toml_one():
    with pytest.raises(BdvaeError, match=r"^train.epochs must be an integer, got '3'$"):
        TrainConfig(epochs="3")
    with pytest.raises(BdvaeError, match=r"^objective.beta must be a number, got '2'$"):
        ObjectiveConfig(beta="2")
    assert ObjectiveConfig(beta=2).beta == 2.0 and isinstance(ObjectiveConfig(beta=2).beta, float)
    assert ModelConfig(arch="resnet", widths=[16, 32, 64]).widths == (16, 32, 64)  # a list, as TOML gives it
