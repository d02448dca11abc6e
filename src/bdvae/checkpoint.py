"""A run directory on disk: resolved config, weights (safetensors), run facts; and loading it back.

Layout (see README, "The run directory"):
    config.toml        the resolved config (written first); enough, with run.json, to rebuild the model
    run.json           bdvae version, image shape (C, H, W), data source, epochs done, wall time
    model.safetensors  the VAE's weights
    checkpoints/       the newest training states (step-NNNNNNNNN.safetensors), for `train --resume`
Every file is written to a temporary name in the same folder and renamed into place. A training
state is one safetensors file: tensors (weights, optimizer moments, RNG state, the epoch's data
order) plus JSON metadata, sealed by a sha256 over both that is checked on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bdvae import __version__, config as config_lib
from bdvae.config import Config
from bdvae.errors import BdvaeError, first_line
from bdvae.model import VAE, build_model

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
STATES_DIR = "checkpoints"
KEEP_STATES = 2  # the newest and the one before it, in case the newest is damaged


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the user's usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as written:  # on disk before the rename, so a power cut leaves old or new
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_run(run_dir: Path, model: VAE, config: Config, facts: dict[str, Any]) -> None:
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"bdvae_version": __version__})
    write_text(run_dir / CONFIG_FILE, config_lib.dumps(config))
    write_text(run_dir / RUN_FILE, json.dumps({"bdvae_version": __version__, **facts}, indent=2) + "\n")


def load_model(run_dir: Path) -> tuple[VAE, Config, dict[str, Any]]:
    """The trained VAE of a run directory (in eval mode), its config and run facts."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, RUN_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise BdvaeError(f"{run_dir}: not a finished run (no {name})")
    config = config_lib.load(run_dir / CONFIG_FILE)
    try:
        facts = json.loads((run_dir / RUN_FILE).read_text())
        shape = tuple(int(n) for n in facts["image_shape"])
        if len(shape) != 3 or min(shape) <= 0:
            raise ValueError(f"image_shape {list(shape)} is not 3 positive sizes")
    except (ValueError, KeyError, TypeError) as e:
        raise BdvaeError(f"{run_dir / RUN_FILE}: damaged ({e})") from None
    model = build_model(config.model, config.objective, shape)  # type: ignore[arg-type]
    try:
        state = load_file(str(run_dir / WEIGHTS_FILE))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise BdvaeError(f"{run_dir / WEIGHTS_FILE}: does not fit this run's model ({first_line(e)})") from None
    model.eval()
    return model, config, facts


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """An existing non-empty run directory is an error unless `overwrite`; touches nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BdvaeError(f"{run_dir}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise BdvaeError(f"{run_dir}: run directory exists; pass --overwrite to replace it or choose another --out")


# What a run directory holds (besides config.toml, written first): removed by --overwrite, so that
# nothing of the old run (its weights, its metrics, a finished marker) is mistaken for the new one's.
RUN_OUTPUTS = (RUN_FILE, WEIGHTS_FILE, "metrics.jsonl", "metrics.json", "loss_curve.png", "originals.png",
               "reconstructions.png", "samples.png")
RUN_OUTPUT_DIRS = (STATES_DIR, "eval")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory (checked again) and make sure it can be written; with `overwrite`,
    remove the old run's outputs first (files a user added are left alone)."""
    check_run_dir(run_dir, overwrite)
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



def _digest(tensors: dict[str, torch.Tensor], state_json: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and the JSON state."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(state_json.encode())
    return h.hexdigest()


def state_paths(run_dir: Path) -> list[Path]:
    """The training states of a run, oldest first."""
    return sorted((run_dir / STATES_DIR).glob("step-*.safetensors"))


def save_state(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a training state as RUN/checkpoints/step-STEP.safetensors; keep only the newest KEEP_STATES."""
    folder = run_dir / STATES_DIR
    folder.mkdir(exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    state_json = json.dumps(state)
    path = folder / f"step-{step:09d}.safetensors"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": state_json, "sha256": _digest(tensors, state_json),
                                               "bdvae_version": __version__})
    for old in state_paths(run_dir)[:-KEEP_STATES]:
        old.unlink()
    return path


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON state of a training state file, after checking its sha256."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state_json, expected = meta["state"], meta["sha256"]
        if _digest(tensors, state_json) != expected:
            raise ValueError("checksum mismatch")
        return tensors, json.loads(state_json)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise BdvaeError(f"{path}: damaged checkpoint ({first_line(e)})") from None


def latest_state(run_dir: Path, log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest training state that loads and verifies; damaged ones are reported and skipped."""
    for path in reversed(state_paths(run_dir)):
        try:
            return load_state(path)
        except BdvaeError as e:
            log(f"{e}; using the one before it")
    return None
