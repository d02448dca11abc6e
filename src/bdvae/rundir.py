"""The run directory: the one module that knows its file names, whether a run is finished or can
be resumed, and the format of a fitted sampler's files (a training state's is states.py's).

Layout (docs/run-directory.md):
    config.toml        the resolved config (written first); enough, with run.json, to rebuild the model
    run.json           bdvae version, image shape (C, H, W), data source, epochs done, wall time
    model.safetensors  the VAE's weights (written last, with run.json: a run without them is unfinished)
    metrics.jsonl      one row per epoch; loss_curve.png plots them
    originals.png, reconstructions.png, samples.png   the three pictures of every run
    checkpoints/       the newest training states (step-NNNNNNNNN.safetensors), for `train --resume`
    metrics.json, eval/   written by `bdvae evaluate` (eval/iwae-progress.safetensors while its IWAE is unfinished)
    samplers/          latent samplers fitted after training (NAME.safetensors, then NAME.json)
    tensorboard/       TensorBoard's event files, with train.tensorboard = true
Every file is written through files.atomic_path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bdvae import config as config_lib, logs, states
from bdvae._version import __version__
from bdvae.config import Config, ModelConfig, ObjectiveConfig
from bdvae.devices import check_memory
from bdvae.errors import BdvaeError, first_line
from bdvae.files import atomic_path, strict_json, write_json, write_text
from bdvae.model import VAE, build_model, parameter_bytes
from bdvae.samplers import SAMPLERS, FitOptions, Sampler, fit, fit_call, fit_command, parse_name

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_LOG = "metrics.jsonl"  # training: a row per epoch
METRICS_FILE = "metrics.json"  # evaluation
LOSS_CURVE = "loss_curve.png"
ORIGINALS, RECONSTRUCTIONS, SAMPLES = "originals.png", "reconstructions.png", "samples.png"
STATES_DIR = "checkpoints"
EVAL_DIR = "eval"
# The evaluation's pictures, as paths relative to the run directory (the report links them so).
LATENT_HISTOGRAMS, LATENT_MEANS = f"{EVAL_DIR}/latent_histograms.png", f"{EVAL_DIR}/latent_means.png"
INTERPOLATION, TRAVERSAL = f"{EVAL_DIR}/interpolation.png", f"{EVAL_DIR}/traversal.png"
IWAE_PROGRESS = f"{EVAL_DIR}/iwae-progress.safetensors"  # an unfinished IWAE, until metrics.json is written
SAMPLERS_DIR = "samplers"
TENSORBOARD_DIR = "tensorboard"  # event files, with train.tensorboard = true
WEIGHTS_SHA256 = "weights_sha256"  # run.json's record of the weights file's sha256
KEEP_STATES = 2  # the newest and the one before it, in case the newest is damaged
FINISHED = (CONFIG_FILE, RUN_FILE, WEIGHTS_FILE)  # a finished run has them all: run.json and the weights come last

# What --overwrite removes (config.toml is written anew at once): nothing of the old run (its
# weights, its metrics, a finished marker, samplers fitted to its latents) may be mistaken for the
# new one's. Other files stay.
RUN_OUTPUTS = (RUN_FILE, WEIGHTS_FILE, METRICS_LOG, METRICS_FILE, LOSS_CURVE, ORIGINALS, RECONSTRUCTIONS, SAMPLES)
RUN_OUTPUT_DIRS = (STATES_DIR, EVAL_DIR, SAMPLERS_DIR, TENSORBOARD_DIR)


# ---------------------------------------------------------------------------------------------
# What a folder holds


def is_started(run_dir: Path) -> bool:
    """Whether training has begun here: config.toml is written first."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def is_finished(run_dir: Path) -> bool:
    """Whether a training ended here: run.json and the weights are written last."""
    return all((Path(run_dir) / name).is_file() for name in FINISHED)


def check_finished(run_dir: Path) -> None:
    """An error naming the first missing file unless `run_dir` holds a finished run."""
    for name in FINISHED:
        if not (Path(run_dir) / name).is_file():
            raise BdvaeError(f"{run_dir}: not a finished run (no {name})")


def check_resumable(run_dir: Path) -> None:
    """An error unless `run_dir` holds a started, unfinished run."""
    if not is_started(run_dir):
        raise BdvaeError(f"{run_dir}: nothing to resume (no {CONFIG_FILE})")
    if (Path(run_dir) / RUN_FILE).is_file():
        raise BdvaeError(f"{run_dir}: the run is finished already; nothing to resume")


def check_new(run_dir: Path, overwrite: bool) -> None:
    """An existing non-empty run directory is an error unless `overwrite`; touches nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BdvaeError(f"{run_dir}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise BdvaeError(f"{run_dir}: run directory exists; pass --overwrite to replace it or choose another --out",
                         python=f"{run_dir}: run directory exists; pass overwrite=True to replace it or choose another run_dir")


def prepare(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory (checked again) and make sure it can be written; with `overwrite`,
    remove the old run's outputs first (files a user added are left alone)."""
    check_new(run_dir, overwrite)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        for name in RUN_OUTPUT_DIRS:
            if (run_dir / name).is_dir():
                shutil.rmtree(run_dir / name)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise BdvaeError(f"{run_dir}: cannot write there ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------
# Config, weights, facts, metrics


def read_config(run_dir: Path) -> Config:
    return config_lib.load(Path(run_dir) / CONFIG_FILE)


def write_config(run_dir: Path, config: Config) -> None:
    write_text(run_dir / CONFIG_FILE, config_lib.dumps(config))


def save_run(run_dir: Path, model: nn.Module, config: Config, facts: dict[str, Any]) -> None:
    """The end of a training: the weights, the config and run.json (whose presence marks it
    finished), which records the weights' sha256 that every load checks."""
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"bdvae_version": __version__})
    write_config(run_dir, config)
    write_json(run_dir / RUN_FILE, {"bdvae_version": __version__, **facts, WEIGHTS_SHA256: weights_digest(run_dir)})


@dataclass(frozen=True)
class TrainedRun:
    """A finished run as loaded: its directory, config, facts (run.json) and model (eval mode)."""

    path: Path
    config: Config
    facts: dict[str, Any]
    model: VAE

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.facts["image_shape"])  # type: ignore[return-value]


def load(run_dir: Path) -> TrainedRun:
    """The finished run in `run_dir`; one line if it is unfinished or damaged."""
    model, config, facts = load_model(run_dir)
    return TrainedRun(path=Path(run_dir), config=config, facts=facts, model=model)


def check_model_size(model: ModelConfig, objective: ObjectiveConfig, shape: tuple[int, ...], device: torch.device) -> None:
    """Refuse in one line a model whose weights alone exceed the memory available where it is built
    (the CPU) and where it will run (`device`), before build_model allocates them."""
    need = parameter_bytes(model, objective, shape)
    for where in dict.fromkeys((torch.device("cpu"), device)):
        check_memory(need, f"the model (model.arch={model.arch!r}, latent_dim={model.latent_dim}, "
                           f"widths={list(model.resolved_widths)}: {need // 4:,} weights)", where,
                     "use a smaller model.latent_dim or model.widths")


def load_model(run_dir: Path, log: Callable[[str], None] = logs.info) -> tuple[VAE, Config, dict[str, Any]]:
    """The trained VAE of a run directory (in eval mode), its config and run facts; one line if
    the weights are not those training wrote (their sha256 in run.json) or hold non-finite values."""
    run_dir = Path(run_dir)
    check_finished(run_dir)
    config = read_config(run_dir)
    try:
        facts = json.loads((run_dir / RUN_FILE).read_text())
        shape = tuple(int(n) for n in facts["image_shape"])
        if len(shape) != 3 or min(shape) <= 0:
            raise ValueError(f"image_shape {list(shape)} is not 3 positive sizes")
    except (ValueError, KeyError, TypeError) as e:
        raise BdvaeError(f"{run_dir / RUN_FILE}: damaged ({e})") from None
    weights = run_dir / WEIGHTS_FILE
    if WEIGHTS_SHA256 not in facts:
        log(f"{weights}: written before bdvae recorded its sha256, so it is loaded unchecked")
    elif weights_digest(run_dir) != facts[WEIGHTS_SHA256]:
        raise BdvaeError(f"{weights}: its sha256 is not the one {RUN_FILE} recorded when training wrote it; "
                         "the file was changed or damaged since")
    check_model_size(config.model, config.objective, shape, torch.device("cpu"))  # type: ignore[arg-type]
    model = build_model(config.model, config.objective, shape)  # type: ignore[arg-type]
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise BdvaeError(f"{weights}: does not fit this run's model ({first_line(e)})") from None
    if bad := [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]:
        raise BdvaeError(f"{weights}: {bad[0]} holds NaN or infinite values ({len(bad)} of {len(state)} tensors do); "
                         "a diverged model cannot be evaluated or sampled")
    model.eval()
    return model, config, facts


def write_metrics_log(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.jsonl: one JSON object per epoch."""
    write_text(run_dir / METRICS_LOG, "".join(strict_json(r) + "\n" for r in rows))


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(Path(run_dir) / METRICS_FILE, metrics)


# Keys that metrics.json (and an unfinished IWAE's setting) wrote under an older name, by where
# they sit: (section or "" for the top level, old key, new key). The IWAE decoder's arithmetic,
# now "dtype", was "precision" at first: a word the sample-quality metric precision/recall uses too.
RENAMED_KEYS = (("options", "precision", "dtype"), ("iwae_nll", "precision", "dtype"))


def _renamed(section: Any, old: str, new: str) -> None:
    if isinstance(section, dict) and old in section and new not in section:
        section[new] = section.pop(old)


# --max-batch's old default, now unset (sized by the device): on a CPU both decode 256 latents at
# once, on a GPU they chunk K otherwise, which moves -ln p(x) by float rounding only.
OLD_MAX_BATCH = 1000


def upgrade_metrics(metrics: Any) -> Any:
    """A metrics dict as the current version writes it: keys of older versions renamed (RENAMED_KEYS)
    and --max-batch's old default read as unset, in place; anything else is left as it is."""
    if isinstance(metrics, dict):
        for section, old, new in RENAMED_KEYS:
            _renamed(metrics.get(section) if section else metrics, old, new)
        options = metrics.get("options")
        if isinstance(options, dict) and options.get("max_batch") == OLD_MAX_BATCH:
            options["max_batch"] = None
    return metrics


def read_metrics(run_dir: Path) -> Any:
    """The evaluation's metrics.json, its older keys renamed (upgrade_metrics); None when there is
    none, ValueError (or OSError) when it cannot be read."""
    path = Path(run_dir) / METRICS_FILE
    return upgrade_metrics(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def read_run_facts(run_dir: Path) -> dict[str, Any]:
    """run.json (bdvae version, image shape, epochs done, ...) as JSON holds it; {} where there is
    none or it is damaged: for what reports say about a run, never to rebuild one (load_model)."""
    try:
        facts = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def samples_picture(name: str) -> str:
    """eval/samples-NAME.png: the first draws of sampler NAME that the evaluation scored."""
    return f"{EVAL_DIR}/samples-{name}.png"


def remove_other_pictures(run_dir: Path, keep: list[str]) -> None:
    """Remove the pictures in eval/ that are not in `keep` (paths relative to the run directory):
    an earlier evaluation's, such as the samples of a sampler not scored now, or all of them after
    `--no-pictures`, so that none is read beside figures it does not belong to."""
    for picture in (Path(run_dir) / EVAL_DIR).glob("*.png"):
        if f"{EVAL_DIR}/{picture.name}" not in keep:
            picture.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Fitted latent samplers: RUN/samplers/NAME.safetensors (the arrays), then NAME.json (kind,
# options, what it was fitted on, the arrays' sha256), written in that order: a sampler without
# its JSON is not fitted.


def sampler_paths(run_dir: Path, name: str) -> tuple[Path, Path]:
    """RUN/samplers/NAME.safetensors and RUN/samplers/NAME.json."""
    folder = Path(run_dir) / SAMPLERS_DIR
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def fitted_names(run_dir: Path) -> list[str]:
    """The samplers fitted in a run directory, sorted (the prior, never stored, not among them)."""
    folder = Path(run_dir) / SAMPLERS_DIR
    return sorted(p.stem for p in folder.glob("*.json") if (folder / f"{p.stem}.safetensors").is_file())


def is_fitted(run_dir: Path, name: str) -> bool:
    return name == "prior" or all(p.is_file() for p in sampler_paths(run_dir, name))


def save_sampler(run_dir: Path, sampler: Sampler, options: FitOptions, latents: int, seconds: float) -> Path:
    """Write RUN/samplers/NAME.safetensors, then NAME.json (the sampler counts as fitted once both are there)."""
    weights_path, json_path = sampler_paths(run_dir, options.name)
    weights_path.parent.mkdir(exist_ok=True)
    json_path.unlink(missing_ok=True)  # a refit: the old JSON must not vouch for the new arrays, even for a moment
    arrays = {k: v.detach().contiguous().cpu() for k, v in sampler.arrays().items()}
    with atomic_path(weights_path) as tmp:
        save_file(arrays, str(tmp))
    facts = {"name": options.name, "kind": options.kind, "latent_dim": sampler.latent_dim,
             "fit": {"seed": options.seed, "fit_on": options.fit_on, "latents": latents},
             "params": sampler.params(), "sha256": states.digest(arrays), "seconds": round(seconds, 2)}
    try:
        write_json(json_path, facts)
    except OSError:  # a full disk, say: no arrays left behind without the JSON that vouches for them
        weights_path.unlink(missing_ok=True)
        raise
    return weights_path


def read_facts(run_dir: Path, name: str) -> dict[str, Any]:
    """The JSON beside a fitted sampler; one line if it is missing or damaged."""
    _, json_path = sampler_paths(run_dir, name)
    if not json_path.is_file():
        options = parse_name(name)
        raise BdvaeError(f"{run_dir}: no fitted sampler {name!r}; fit it with: {fit_command(run_dir, options)}",
                         python=f"{run_dir}: no fitted sampler {name!r}; fit it with: {fit_call(run_dir, options)}")
    try:
        facts = json.loads(json_path.read_text(encoding="utf-8"))
        missing = {"kind", "latent_dim", "sha256", "fit", "params"} - set(facts) if isinstance(facts, dict) else {"everything"}
        if not missing:
            missing = {"seed", "fit_on", "latents"} - set(facts["fit"]) if isinstance(facts["fit"], dict) else {"fit"}
        if missing or not isinstance(facts["params"], dict):
            raise ValueError(f"no {', '.join(sorted(missing or {'params'}))}")
    except (ValueError, OSError) as e:
        raise BdvaeError(f"{json_path}: damaged ({first_line(e)})") from None
    return facts


def load_sampler(run_dir: Path, name: str, latent_dim: int) -> Sampler:
    """The sampler `name` of a run whose latents have `latent_dim` dimensions: the prior, or a
    fitted one from RUN/samplers/, checked against its sha256 and the latent size."""
    options = parse_name(name)
    if options.kind == "prior":
        return SAMPLERS["prior"](latent_dim)
    name = options.name  # "gmm" is stored as gmm-10
    weights_path, json_path = sampler_paths(run_dir, name)
    facts = read_facts(run_dir, name)
    if facts["kind"] != options.kind or facts["kind"] not in SAMPLERS:
        raise BdvaeError(f"{json_path}: describes a sampler of kind {facts['kind']!r}, not {options.kind!r}")
    if facts["latent_dim"] != latent_dim:
        raise BdvaeError(f"{json_path}: fitted for {facts['latent_dim']} latent dimensions, this run's model "
                         f"has {latent_dim}; fit it again with bdvae sampler fit --overwrite")
    try:
        arrays = load_file(str(weights_path))
        if states.digest(arrays) != facts["sha256"]:
            raise ValueError("checksum mismatch")
        return SAMPLERS[options.kind].from_arrays(latent_dim, arrays, facts["params"])
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise BdvaeError(f"{weights_path}: damaged sampler file ({first_line(e)})") from None


def fit_sampler(run_dir: Path, model: nn.Module, binarize: bool, train_images: Tensor, options: FitOptions,
                log: Callable[[str], None] = logs.info, overwrite: bool = False) -> Sampler:
    """Fit the sampler `options` describes on the run's training latents and store it in
    RUN/samplers/. An existing one is an error unless `overwrite`."""
    if options.kind != "prior" and is_fitted(run_dir, options.name) and not overwrite:
        where = sampler_paths(run_dir, options.name)[0]
        raise BdvaeError(f"{where}: fitted already; pass --overwrite to fit it again",
                         python=f"{where}: fitted already; pass overwrite=True to fit it again")
    started = time.perf_counter()
    sampler, latents = fit(model, binarize, train_images, options, log)
    save_sampler(run_dir, sampler, options, latents, time.perf_counter() - started)
    return sampler


def ensure_samplers(run_dir: Path, model: nn.Module, binarize: bool, train_images: Tensor, names: tuple[str, ...],
                    latent_dim: int, log: Callable[[str], None] = logs.info) -> dict[str, Sampler]:
    """The samplers `names` of a run, by name: loaded where fitted, else fitted with their default
    options (seed 0) and stored first."""
    out: dict[str, Sampler] = {}
    for name in names:
        options = parse_name(name)
        if is_fitted(run_dir, options.name):
            out[name] = load_sampler(run_dir, options.name, latent_dim)
        else:
            out[name] = fit_sampler(run_dir, model, binarize, train_images, options, log)
    return out


# ---------------------------------------------------------------------------------------------
# Training states: their files (the format is states.py's)


def state_paths(run_dir: Path) -> list[Path]:
    """The training states of a run, oldest first."""
    return sorted((Path(run_dir) / STATES_DIR).glob("step-*.safetensors"))


def save_state(run_dir: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any]) -> Path:
    """Write a training state as RUN/checkpoints/step-STEP.safetensors; keep only the newest KEEP_STATES."""
    folder = Path(run_dir) / STATES_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"step-{step:09d}.safetensors"
    states.save_sealed(path, tensors, state)
    for old in state_paths(run_dir)[:-KEEP_STATES]:
        old.unlink()
    return path


def save_training_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, pos: states.Position,
                        generator: torch.Generator) -> Path:
    """Write the training state (states.pack) of `pos.global_step` into RUN/checkpoints/."""
    return save_state(run_dir, pos.global_step, *states.pack(model, optimizer, pos, generator))


def latest_state(run_dir: Path, log: Callable[[str], None]) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest training state that loads and verifies; damaged ones are reported and skipped."""
    paths = state_paths(run_dir)
    for i in reversed(range(len(paths))):
        try:
            return states.load(paths[i])
        except BdvaeError as e:
            log(f"{e}; {'trying the one before it' if i else 'no earlier one'}")
    return None


# ---------------------------------------------------------------------------------------------
# An unfinished IWAE: the evaluation's long part, resumable. One sealed file holds the per-image
# -ln p(x) so far and the state of the generator after them; `setting` (K, seed, images, dtype,
# device, decode batch, the weights' sha256) must match exactly for a later evaluation to go on
# from it, so that the finished figure is the one an uninterrupted evaluation gives.


def weights_digest(run_dir: Path) -> str:
    """sha256 of the run's weights file: what ties an unfinished IWAE to the model it scored."""
    with open(Path(run_dir) / WEIGHTS_FILE, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_iwae_progress(run_dir: Path, setting: dict[str, Any], nll: Tensor, generator_state: Tensor) -> Path:
    path = Path(run_dir) / IWAE_PROGRESS
    path.parent.mkdir(exist_ok=True)
    states.save_sealed(path, {"nll": nll, states.GENERATOR_KEY: generator_state}, {"setting": setting})
    return path


def load_iwae_progress(run_dir: Path, setting: dict[str, Any], log: Callable[[str], None]) -> tuple[Tensor, Tensor] | None:
    """(-ln p(x) of the images done, the generator state after them) of an unfinished IWAE of
    exactly `setting`, or None: none, another setting's (it is replaced), or damaged (it is only
    progress: the IWAE starts again, and says so)."""
    path = Path(run_dir) / IWAE_PROGRESS
    if not path.is_file():
        return None
    try:
        tensors, state = states.load_sealed(path)
        _renamed(state["setting"], "precision", "dtype")  # a pass stopped by an older version
        if state["setting"] != setting:
            log(f"{path}: an unfinished IWAE of other options or weights; starting anew")
            return None
        return tensors["nll"], tensors[states.GENERATOR_KEY]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        log(f"{path}: damaged ({first_line(e)}); the IWAE starts anew")
        return None


def clear_iwae_progress(run_dir: Path) -> None:
    (Path(run_dir) / IWAE_PROGRESS).unlink(missing_ok=True)
