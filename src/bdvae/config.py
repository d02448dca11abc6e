"""Run configuration: TOML file -> dict -> ``section.key=value`` overrides -> frozen dataclasses.

Every field has a docstring, the one place its meaning is written: ``meanings()`` reads them for
``bdvae config show``, the documentation and the errors. Validation lives in ``__post_init__`` so
that an invalid value can never exist as a config object. Unknown keys and values are an error
that lists the valid ones and suggests the nearest. ``None`` means "not set" (TOML has no null:
such keys are simply left out).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.resources
import math
import sys
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from bdvae.errors import BdvaeError, check_seed

LR_SCHEDULES = ("constant", "cosine")
STEPS = ("auto", "host", "device", "graph")  # train.step


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BdvaeError(message)


def _nearest(value: Any, choices: typing.Iterable[Any], prefix: str = "") -> str:
    """" (did you mean 'x'?)" for the choice nearest to a misspelt `value` (named with `prefix`
    before it), or "" when none is near."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _one_of(where: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """`value` must be one of `choices`: else one line naming them and the nearest."""
    choices = list(choices)
    _require(value in choices, f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}{_nearest(value, choices)}")


def _positive(section: str, name: str, value: int | float | None) -> None:
    _require(value is None or (value > 0 and math.isfinite(value)), f"{section}.{name} must be positive, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which images to train on and how to prepare them."""

    name: str = "mnist"
    """The images: mnist, fashion_mnist, idx (an image IDX file, and labels_path), npz
    (x_train/y_train/x_test/y_test, x/y or images/labels; or a .npy of images) or folder (PNG/JPEG files; a
    first-level sub-folder name is the label)."""
    path: str | None = None
    """The data file or folder; for mnist and fashion_mnist, a folder holding the four IDX files (unset: fetch
    them)."""
    labels_path: str | None = None
    """idx: the label file that goes with path."""
    data_dir: str | None = None
    """The dataset cache (also --data-dir); unset: $BDVAE_DATA_DIR, else $XDG_CACHE_HOME/bdvae, else
    ~/.cache/bdvae."""
    train_size: int | None = None
    """Use only the first N training images (unset: all)."""
    test_size: int | None = None
    """Use only the first N test images (unset: all)."""
    test_fraction: float = 0.1
    """Data without a test split (idx, npz, folder): the share held out as test images, by a fixed permutation."""
    pad: int | None = None
    """Zero pixels added on each side (unset: 2 for 28x28 images, else 0)."""
    image_size: int | None = None
    """folder: resize every image to a square of this size (unset: as the images are)."""
    channels: int | None = None
    """folder: 1 (grayscale) or 3 (RGB) (unset: from the images)."""

    def __post_init__(self) -> None:
        from bdvae.data import DATASETS  # the registry; data.py imports nothing from here

        _typed(self, "data")
        _one_of("data.name", self.name, DATASETS)
        for name in ("train_size", "test_size", "image_size"):
            _positive("data", name, getattr(self, name))
        _require(0 < self.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        _require(self.pad is None or self.pad >= 0, f"data.pad must be >= 0, got {self.pad!r}")
        _require(self.channels in (None, 1, 3), f"data.channels must be 1 or 3, got {self.channels!r}")
        _require(not DATASETS[self.name].needs_path or self.path is not None, f"data.name={self.name!r} needs data.path")


def _architectures() -> dict[str, Any]:
    # Imported when a config is checked: model.py holds the registry and imports nothing from here.
    from bdvae.model import ARCHITECTURES

    return ARCHITECTURES


def _option_choices() -> dict[str, tuple[str, ...]]:
    from bdvae.model import CHOICES  # the architectures' options that take a name, and the names

    return CHOICES


def _toml_value(value: Any) -> str:
    return f"[{', '.join(map(str, value))}]" if isinstance(value, tuple) else repr(value)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The encoder/decoder architecture: an entry of model.ARCHITECTURES and what it takes."""

    arch: str = "reference"
    """The architecture: reference (the fixed reference design), conv (its shape with your widths and latent_dim),
    mlp (any image shape) or resnet (residual blocks and BatchNorm or GroupNorm, the quality preset's)."""
    latent_dim: int = 16
    """Latent dimensions (reference fixes 16: set arch = "conv" to change it)."""
    widths: tuple[int, ...] | None = None
    """Channels of each stride-2 conv layer, or the MLP's hidden sizes (unset: 32, 64, 128 for conv and resnet,
    512, 256 for mlp; reference fixes 32, 64, 128)."""
    blocks: int | None = None
    """resnet only: residual blocks at each resolution (unset: 1)."""
    norm: str | None = None
    """resnet only: the normalisation after each convolution, batch (BatchNorm: a training batch's own statistics,
    running averages in evaluation) or group (GroupNorm, 8 groups: each image's own, in training as in evaluation)
    (unset: batch)."""

    def __post_init__(self) -> None:
        _typed(self, "model")
        archs = _architectures()
        _one_of("model.arch", self.arch, archs)
        _positive("model", "latent_dim", self.latent_dim)
        if self.widths is not None:
            _require(len(self.widths) > 0, "model.widths must not be empty")
            for w in self.widths:
                _positive("model", "widths", w)
        for name in sorted({option for entry in archs.values() for option in entry.options}):
            value = getattr(self, name)
            takers = " or ".join(repr(a) for a, entry in archs.items() if name in entry.options)
            choices = _option_choices().get(name)  # None: a count
            if choices is not None:
                _require(value is None or name in archs[self.arch].options,
                         f"model.{name} applies to model.arch={takers} only, got {value!r}")
                if value is not None:
                    _one_of(f"model.{name}", value, choices)
            else:
                _require(value is None or (name in archs[self.arch].options and value >= 0),
                         f"model.{name} applies to model.arch={takers} only and must be >= 0, got {value!r}")
                _require(value is None or value <= MAX_ITEMS, f"model.{name}: at most {MAX_ITEMS:,}, got {value!r}")
        fixed = archs[self.arch].fixed
        if fixed:
            given = {"latent_dim": self.latent_dim, "widths": self.resolved_widths}
            _require(all(given[k] == v for k, v in fixed.items()),
                     f"model.arch={self.arch!r} fixes "
                     + " and ".join(f"{k}={_toml_value(v)}" for k, v in fixed.items())
                     + f"; use model.arch={archs[self.arch].unfixed!r} to change them")

    @property
    def resolved_widths(self) -> tuple[int, ...]:
        return self.widths if self.widths is not None else _architectures()[self.arch].default_widths


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """The loss: -log p(x|z) + beta * regularizer(q(z|x) || N(0, I))."""

    likelihood: str = "bernoulli"
    """-ln p(x|z): bernoulli (cross-entropy on intensities in [0, 1]), bernoulli_binarized (dynamically binarized
    images), gaussian (fixed sigma) or gaussian_learned."""
    regularizer: str = "bhattacharyya"
    """The divergence of q(z|x) from N(0, I): bhattacharyya, kl, hellinger, renyi or wasserstein."""
    beta: float = 1.0
    """The regularizer's weight, >= 0."""
    warmup_steps: int = 0
    """beta rises linearly from beta/N to beta over the first N optimizer steps (0: no warm-up)."""
    alpha: float = 0.5
    """renyi: the order alpha, > 0 and not 1."""
    sigma: float = 0.1
    """Gaussian likelihoods: the fixed standard deviation, or the initial one."""
    aggregate: str | None = None
    """A term on the batch's aggregate posterior, added to every image's loss: bhattacharyya (the BD of its
    moment-matched Gaussian to N(0, I)) or mmd (an unbiased MMD² of its draws to N(0, I) draws); unset: none."""
    aggregate_weight: float = 1.0
    """The aggregate term's weight, >= 0."""

    def __post_init__(self) -> None:
        _typed(self, "objective")
        # Imported here: the registries import nothing from config, so there is no cycle.
        from bdvae.aggregates import AGGREGATES
        from bdvae.likelihoods import LIKELIHOODS
        from bdvae.regularizers import REGULARIZERS

        _one_of("objective.likelihood", self.likelihood, LIKELIHOODS)
        _one_of("objective.regularizer", self.regularizer, REGULARIZERS)
        _require(self.beta >= 0 and math.isfinite(self.beta), f"objective.beta must be >= 0 and finite, got {self.beta!r}")
        _positive("objective", "sigma", self.sigma)
        _require(self.warmup_steps >= 0, f"objective.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _require(self.alpha > 0 and self.alpha != 1 and math.isfinite(self.alpha),
                 f"objective.alpha must be positive, finite and not 1, got {self.alpha!r}")
        if self.aggregate is not None:
            _one_of("objective.aggregate", self.aggregate, AGGREGATES)
        _require(self.aggregate_weight >= 0 and math.isfinite(self.aggregate_weight),
                 f"objective.aggregate_weight must be >= 0 and finite, got {self.aggregate_weight!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation: Adam over shuffled mini-batches."""

    epochs: int = 10
    """Passes over the training images."""
    batch_size: int = 128
    """Images per optimizer step, per process."""
    lr: float = 1e-3
    """Adam's learning rate."""
    lr_schedule: str = "constant"
    """constant, or cosine: lr (1 + cos(pi t)) / 2 at the share t of the epochs done, from lr down to 0."""
    seed: int = 0
    """Seeds the one generator training draws from (weights, data order, binarization, noise)."""
    threads: int | None = None
    """torch's intra-op threads (unset: torch's choice)."""
    checkpoint_every: int = 200
    """Optimizer steps between saved training states (0: only at the end of each epoch)."""
    skip_nonfinite: bool = False
    """Skip and count batches whose loss or gradient is NaN or infinite, instead of stopping."""
    max_skipped_share: float = 0.5
    """With skip_nonfinite: an epoch that skips more than this share of its batches stops the run, a diverged one
    (so does a non-finite test loss)."""
    mixed_precision: bool = True
    """The forward under bf16 autocast where bf16 is faster than fp32, a CPU with AMX or a GPU with bf16 (weights,
    Adam and the loss sums stay fp32); no effect elsewhere."""
    log_every: int = 50
    """Optimizer steps between the step figures given to callbacks and TensorBoard (loss terms, lr, beta, gradient
    norm; 0: none)."""
    tensorboard: bool = False
    """Write TensorBoard event files under RUN/tensorboard/ (needs the tensorboard package: bdvae[tensorboard])."""
    step: str = "auto"
    """host: each batch drawn on the CPU, its loss and gradient norm checked on the host every step; device: the
    images, the draws (a generator on the device), the loss sums and the non-finite checks stay on the training
    device, Adam is fused, and a non-finite step makes no update and is reported at the next progress, log or
    checkpoint point; graph: device, with the update captured once in a CUDA graph and replayed (eager where it
    cannot be; the log and the run's facts say which); auto: graph on a GPU, host on a CPU."""

    def __post_init__(self) -> None:
        _typed(self, "train")
        for name in ("epochs", "batch_size", "lr", "threads"):
            _positive("train", name, getattr(self, name))
        _one_of("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of("train.step", self.step, STEPS)
        _require(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        _require(self.log_every >= 0, f"train.log_every must be >= 0, got {self.log_every!r}")
        _require(0 <= self.max_skipped_share < 1, f"train.max_skipped_share must be in [0, 1), got {self.max_skipped_share!r}")
        check_seed(self.seed, "train.seed")
        _require(self.threads is None or self.threads <= 1024, f"train.threads must be at most 1024, got {self.threads!r}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run. Written beside the weights as config.toml; enough to rebuild the model."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig, "train": TrainConfig}


def _coerce(section: str, key: str, annotation: Any, value: Any) -> Any:
    """Check `value` against the field's annotation; lists become tuples, ints may be floats."""
    where = f"{section}.{key}"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(section, key, inner[0], value)
    if typing.get_origin(annotation) is tuple:
        _require(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        return tuple(_coerce(section, key, args[0], v) for v in value)
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool),
                 f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if annotation is str:
        _require(isinstance(value, str), f"{where} must be a string, got {value!r}")
        return value
    if annotation is bool:
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    raise AssertionError(f"unhandled annotation {annotation!r}")  # a bug in this module, not user input


def _typed(section_config: Any, section: str) -> None:
    """Every field of a section built in Python checked as from_dict checks a TOML value (lists
    become tuples, ints floats where a float is due), so that a wrong type is one line, not a
    TypeError deep in a check; None only where the field may be unset."""
    for key, annotation in typing.get_type_hints(type(section_config)).items():
        value = getattr(section_config, key)
        if value is not None or type(None) not in typing.get_args(annotation):
            object.__setattr__(section_config, key, _coerce(section, key, annotation, value))


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from nested dicts, refusing unknown sections and keys."""
    sections = {}
    for name, values in raw.items():
        _require(name in SECTIONS, f"unknown config section {name!r}{_nearest(name, SECTIONS)}; valid: {', '.join(SECTIONS)}")
        _require(isinstance(values, dict), f"config section {name!r} must be a table")
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        for key in values:
            _require(key in hints, f"unknown key {name}.{key}{_nearest(key, hints, f'{name}.')}; valid: {', '.join(hints)}")
        sections[name] = cls(**values)  # each section checks its values' types (_typed)
    return Config(**sections)


@functools.cache
def docstrings(cls: type) -> dict[str, str]:
    """{field: its docstring} of a dataclass, read from its module's source, whitespace joined into
    one line: the one place a field's meaning is written."""
    tree = ast.parse(Path(sys.modules[cls.__module__].__file__).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return {field.target.id: " ".join(doc.value.value.split())
            for field, doc in zip(node.body, node.body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def meanings() -> dict[str, str]:
    """{"section.key": its meaning}: the docstring under each field of the section dataclasses."""
    return {f"{section}.{name}": text for section, cls in SECTIONS.items() for name, text in docstrings(cls).items()}


def toml_value(value: Any) -> str:
    """A config value as one line of TOML ("unset" for None)."""
    if value is None:
        return "unset"
    if isinstance(value, (tuple, list)):
        return f"[{', '.join(map(toml_value, value))}]"
    return tomli_w.dumps({"v": value})[len("v = "):].strip()


def show(config: Config, *, preset: str | None = None) -> str:
    """The resolved config as TOML, each key under a comment that gives its meaning and default;
    an unset key is commented out. Valid TOML that `--config` takes back."""
    meaning = meanings()
    lines = [f"# bdvae's configuration: {'preset ' + repr(preset) if preset else 'the defaults'}, with --config and --set "
             "laid over. Each key: its meaning [its default]."]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(SECTIONS[section]):
            value = getattr(getattr(config, section), f.name)
            text = f"{meaning[f'{section}.{f.name}']} [default: {toml_value(f.default)}]"
            lines += textwrap.wrap(text, width=98, initial_indent="# ", subsequent_indent="#   ")
            lines.append(f"{f.name} = {toml_value(value)}" if value is not None else f"# {f.name} =  (unset)")
    return "\n".join(lines) + "\n"


def to_dict(config: Config) -> dict[str, Any]:
    """Nested dicts without the unset (None) values, ready for TOML."""
    return {
        f.name: {k: list(v) if isinstance(v, tuple) else v
                 for k, v in dataclasses.asdict(getattr(config, f.name)).items() if v is not None}
        for f in dataclasses.fields(config)
    }


# Config values that say how a machine runs a model, not which model it is: where it caches the
# data, how many threads it uses, what it reports as it trains, where its step runs, how often it
# saves a training state (a resumed run is the same run). Runs that differ only in them are the same
# run to `compare` (which reuses it) and to `report` (which puts them side by side).
MACHINE_KEYS = ("data.data_dir", "train.threads", "train.log_every", "train.tensorboard", "train.step",
                "train.checkpoint_every")


def flat(config: Config, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"section.key": value} of the set values, leaving out the keys in `without`."""
    return {f"{section}.{key}": value for section, values in to_dict(config).items()
            for key, value in values.items() if f"{section}.{key}" not in without}


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key whose value differs between two flat configs (one may lack it), else None."""
    return next((k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)), None)


def shown(flat_config: dict[str, Any], key: str) -> str:
    """A flat config's value of `key` as an error message shows it: its repr, or "unset"."""
    return repr(flat_config[key]) if key in flat_config else "unset"


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is read as TOML, else as a bare string."""
    name, sep, value_text = text.partition("=")
    section, dot, key = name.strip().partition(".")
    _require(bool(sep and dot and section and key), f"--set expects section.key=value, got {text[:80]!r}")
    where = f"--set {name.strip()[:80]}"
    _require(len(text) <= MAX_STRING + 100, f"{where}: {len(text):,} characters; at most {MAX_STRING + 100:,}")
    try:
        value = _toml(f"v = {value_text}", where)["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return section, key, _bounded(value, where)


PRESETS_PACKAGE = "bdvae.presets"  # each NAME.toml in it is a preset: a config file shipped with bdvae


def preset_names() -> list[str]:
    """The presets shipped in the package, sorted."""
    files = importlib.resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def preset_text(name: str) -> str:
    """The TOML text of preset `name`."""
    names = preset_names()
    _require(name in names, f"unknown preset {name!r}; valid: {', '.join(names)}")
    return importlib.resources.files(PRESETS_PACKAGE).joinpath(f"{name}.toml").read_text(encoding="utf-8")


# What a config may hold: no key nests more than a table of a list (model.widths is a list in a
# table), so these bounds leave room to spare and stop an absurd file before it costs anything.
MAX_FILE_BYTES = 1_000_000
MAX_NESTING = 8  # tables and arrays within one another
MAX_STRING = 4096  # characters of a string (a path)
MAX_ITEMS = 1024  # entries of an array or a table


def _bounded(value: Any, where: str, depth: int = 0) -> Any:
    """`value`, if it is within the bounds above; else one line naming where it is not."""
    _require(depth <= MAX_NESTING, f"{where}: nested more than {MAX_NESTING} levels deep")
    if isinstance(value, str):
        _require(len(value) <= MAX_STRING, f"{where}: a string of {len(value):,} characters; at most {MAX_STRING:,}")
    elif isinstance(value, (list, dict)):
        _require(len(value) <= MAX_ITEMS, f"{where}: {len(value):,} entries; at most {MAX_ITEMS:,}")
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            _bounded(item, f"{where}.{key}" if isinstance(value, dict) else where, depth + 1)
    return value


def _toml(text: str, where: str) -> dict[str, Any]:
    """tomllib.loads, whose parser recurses once per level of nesting: an absurdly deep value is
    a RecursionError there, which is turned into the nesting error of _bounded."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise BdvaeError(f"{where}: nested more than {MAX_NESTING} levels deep") from None


def _read_toml(text: str, where: str) -> dict[str, Any]:
    _require(len(text) <= MAX_FILE_BYTES, f"{where}: {len(text):,} characters; a config holds at most {MAX_FILE_BYTES:,}")
    try:
        return _bounded(_toml(text, where), where)
    except tomllib.TOMLDecodeError as e:
        raise BdvaeError(f"{where} is not valid TOML: {e}") from None


def load(path: str | Path | None = None, overrides: list[str] = (), preset: str | None = None) -> Config:
    """Start from a preset (optional), lay a TOML file over it key by key (optional), apply
    ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {} if preset is None else _read_toml(preset_text(preset), f"preset {preset!r}")
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise BdvaeError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise BdvaeError(f"config {path} is not valid TOML: {e}") from None
        for section, table in _read_toml(text, f"config {path}").items():
            if isinstance(table, dict) and isinstance(raw.get(section), dict):
                raw[section] |= table
            else:
                raw[section] = table  # from_dict reports a non-table section
    for text in overrides:
        section, key, value = parse_override(text)
        table = raw.setdefault(section, {})
        _require(isinstance(table, dict), f"config section {section!r} must be a table")
        table[key] = value
    return from_dict(raw)


def dumps(config: Config) -> str:
    return tomli_w.dumps(to_dict(config))


def absolute_paths(config: Config) -> Config:
    """The same config with its data paths made absolute, so that the saved config.toml still
    finds the data when `bdvae reconstruct` runs from another folder."""
    data = config.data
    resolved = {k: str(Path(v).expanduser().absolute()) for k in ("path", "labels_path", "data_dir")
                if (v := getattr(data, k)) is not None}
    return dataclasses.replace(config, data=dataclasses.replace(data, **resolved))
