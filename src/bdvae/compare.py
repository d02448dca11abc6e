"""`bdvae compare`: train every (regularizer, beta) for every seed, evaluate each run, and report.

    OUT/runs/REGULARIZER-betaBETA-seedSEED/   one ordinary run directory each (train + evaluate)
    OUT/report.md, OUT/report.html            the comparison (see report.py)

Finished runs whose config matches are reused, and so are their metrics when they were computed
with the same evaluation options; a run left unfinished by an interrupted training is resumed from
its newest checkpoint. A run directory holding a different config is an error: nothing a user
made is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdvae import config as config_lib
from bdvae.checkpoint import CONFIG_FILE, RUN_FILE, WEIGHTS_FILE
from bdvae.config import Config
from bdvae.errors import BdvaeError
from bdvae.evaluate import METRICS_FILE, EvalOptions, evaluate_run
from bdvae.locks import file_lock
from bdvae.train import absolute_paths, resume, train


@dataclass(frozen=True)
class Entry:
    """One configuration and seed: where its run lives and its evaluation."""

    regularizer: str
    beta: float
    seed: int
    run_dir: Path
    metrics: dict[str, Any]


REQUIRED_KEYS = {"reconstruction", "divergences", "neg_elbo", "iwae_nll", "prior_match", "sample_quality",
                 "likelihood_note", "test_images"}


def run_name(regularizer: str, beta: float, seed: int) -> str:
    return f"{regularizer}-beta{beta:g}-seed{seed}"


def planned_config(base: Config, regularizer: str, beta: float, seed: int, epochs: int | None) -> Config:
    """The base config with one configuration's regularizer, beta, seed (and epochs) filled in."""
    objective = dataclasses.replace(base.objective, regularizer=regularizer, beta=beta)
    train_cfg = dataclasses.replace(base.train, seed=seed, **({"epochs": epochs} if epochs else {}))
    return absolute_paths(dataclasses.replace(base, objective=objective, train=train_cfg))


def _finished(run_dir: Path) -> bool:
    return all((run_dir / name).is_file() for name in (CONFIG_FILE, RUN_FILE, WEIGHTS_FILE))


def ensure_trained(config: Config, run_dir: Path, progress: bool | None, log: Callable[[str], None]) -> None:
    """Train `run_dir`, resume it, or reuse it if it already holds a finished run of exactly `config`."""
    if (run_dir / CONFIG_FILE).is_file():
        existing = config_lib.load(run_dir / CONFIG_FILE)
        if config_lib.to_dict(existing) != config_lib.to_dict(config):
            raise BdvaeError(f"{run_dir}: holds a run with a different config; choose another --out or move that run away")
        if _finished(run_dir):
            log(f"{run_dir.name}: finished run reused")
        else:
            log(f"{run_dir.name}: resuming an unfinished run")
            resume(run_dir, progress=progress, log=log)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BdvaeError(f"{run_dir}: exists and is not a bdvae run; choose another --out")
    log(f"{run_dir.name}: training")
    train(config, run_dir, progress=progress, log=log)


def ensure_evaluated(run_dir: Path, options: EvalOptions, progress: bool | None,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """The run's metrics.json if it was computed with `options`, else a fresh evaluation."""
    path = run_dir / METRICS_FILE
    if path.is_file():
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
            if (isinstance(metrics, dict) and metrics.get("options") == dataclasses.asdict(options)
                    and REQUIRED_KEYS <= metrics.keys()):
                return metrics
        except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            pass  # a damaged or foreign file is simply computed again
    log(f"{run_dir.name}: evaluating")
    return evaluate_run(run_dir, options, progress=progress, log=log)


def compare(base: Config, regularizers: list[str], betas: list[float], seeds: int, out: Path,
            epochs: int | None = None, options: EvalOptions = EvalOptions(), progress: bool | None = None,
            log: Callable[[str], None] = print) -> list[Entry]:
    """Train and evaluate every configuration for seeds 0 .. seeds-1; write the report into `out`."""
    from bdvae.report import write_report

    if not regularizers or not betas or seeds <= 0:
        raise BdvaeError("compare needs at least one regularizer, one beta and one seed")
    regularizers, betas = list(dict.fromkeys(regularizers)), list(dict.fromkeys(betas))  # each configuration once
    plan = [(r, b, s) for r in regularizers for b in betas for s in range(seeds)]
    names = [run_name(*key) for key in plan]
    if len(set(names)) < len(names):
        raise BdvaeError("--beta values that print alike would share a run directory: "
                         + ", ".join(f"{b!r}" for b in betas))
    configs = {key: planned_config(base, *key, epochs) for key in plan}  # validates every value first
    if out.exists() and not out.is_dir():
        raise BdvaeError(f"--out {out}: exists and is not a directory")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, key in enumerate(plan, 1):
        run_dir = out / "runs" / run_name(*key)
        log(f"[{i}/{len(plan)}] {run_dir.name}")
        # Two compare jobs on one --out take turns on each run: the second finds it finished and reuses it.
        with file_lock(out / "runs" / f".{run_dir.name}.lock"):
            ensure_trained(configs[key], run_dir, progress, log)
            metrics = ensure_evaluated(run_dir, options, progress, log)
        entries.append(Entry(*key, run_dir=run_dir, metrics=metrics))
    write_report(out, entries)
    return entries
