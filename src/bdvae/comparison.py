"""`bdvae compare`: train every (regularizer, beta) for every seed, evaluate each run, and report.

    OUT/runs/REGULARIZER-betaBETA-seedSEED/   one ordinary run directory each (train + evaluate)
    OUT/report.md, OUT/report.html            the comparison (see reporting.py)

Finished runs whose config matches are reused, and so are their metrics when they were computed
with the same evaluation options; a run left unfinished by an interrupted training is resumed from
its newest checkpoint. A run directory holding a different config is an error: nothing a user
made is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bdvae import config as config_lib
from bdvae import logs, rundir
from bdvae.config import Config, absolute_paths
from bdvae.errors import BdvaeError
from bdvae.evaluation import EvalOptions, evaluate_run
from bdvae.files import file_lock
from bdvae.metrics import missing_figures
from bdvae.reporting import Entry, objective_name, report_files_in, write_report
from bdvae.training import resume, train


def run_name(regularizer: str, beta: float, seed: int) -> str:
    return f"{regularizer}-beta{beta:g}-seed{seed}"


def planned_config(base: Config, regularizer: str, beta: float, seed: int, epochs: int | None) -> Config:
    """The base config with one configuration's regularizer, beta, seed (and epochs) filled in."""
    objective = dataclasses.replace(base.objective, regularizer=regularizer, beta=beta)
    train_cfg = dataclasses.replace(base.train, seed=seed, **({"epochs": epochs} if epochs is not None else {}))
    return absolute_paths(dataclasses.replace(base, objective=objective, train=train_cfg))


def ensure_trained(config: Config, run_dir: Path, progress: bool | None, log: Callable[[str], None],
                   device: str = "auto") -> None:
    """Train `run_dir`, resume it, or reuse it if it already holds a run of `config` (where the
    data is cached and the thread count aside: config.MACHINE_KEYS)."""
    if rundir.is_started(run_dir):
        there = config_lib.flat(rundir.read_config(run_dir), without=config_lib.MACHINE_KEYS)
        if key := config_lib.first_difference(config_lib.flat(config, without=config_lib.MACHINE_KEYS), there):
            raise BdvaeError(f"{run_dir}: holds a run with a different config ({key} is {config_lib.shown(there, key)} there); "
                             "choose another --out or move that run away")
        if rundir.is_finished(run_dir):
            log(f"{run_dir.name}: finished run reused")
        else:
            log(f"{run_dir.name}: resuming an unfinished run")
            resume(run_dir, progress=progress, log=log, device=device)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BdvaeError(f"{run_dir}: exists and is not a bdvae run; choose another --out")
    log(f"{run_dir.name}: training")
    train(config, run_dir, progress=progress, log=log, device=device)


def _same_fits(run_dir: Path, scored: dict[str, Any], names: tuple[str, ...]) -> bool:
    """Whether metrics["samplers"] scored exactly the samplers fitted in the run now (a refit with
    --overwrite makes other arrays, and so another sha256)."""
    return all(name == "prior" or (rundir.is_fitted(run_dir, name)
                                   and scored[name]["fit"]["sha256"] == rundir.read_facts(run_dir, name)["sha256"])
               for name in names)


def ensure_evaluated(run_dir: Path, options: EvalOptions, progress: bool | None,
                     log: Callable[[str], None], device: str = "auto") -> dict[str, Any]:
    """The run's metrics.json if it was computed with `options` and holds every reported figure
    (metrics.FIGURES), else a fresh evaluation."""
    try:
        metrics = rundir.read_metrics(run_dir)
        asked = json.loads(json.dumps(dataclasses.asdict(options)))  # as JSON holds it: tuples become lists
        if (isinstance(metrics, dict) and metrics.get("options") == asked
                and not missing_figures(metrics) and _same_fits(run_dir, metrics["samplers"], options.samplers)):
            return metrics
    except (ValueError, OSError, BdvaeError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        pass  # a damaged or foreign file, or one scored with other fits, is simply computed again
    log(f"{run_dir.name}: evaluating")
    return evaluate_run(run_dir, options, progress=progress, log=log, device=device)


def _train_and_evaluate(config: Config, run_dir: Path, options: EvalOptions, progress: bool | None,
                        log: Callable[[str], None], device: str) -> dict[str, Any]:
    # Two compare jobs on one --out take turns on each run: the second finds it finished and reuses it.
    with file_lock(run_dir.parent / f".{run_dir.name}.lock"):
        ensure_trained(config, run_dir, progress, log, device)
        return ensure_evaluated(run_dir, options, progress, log, device)


def gpu_slots(jobs: int, gpus: int) -> list[int]:
    """The GPU of each of `jobs` slots (each runs one configuration at a time): spread over the
    `gpus` GPUs, round robin."""
    return [i % gpus for i in range(jobs)]


def _interrupt_once(signum: int, frame: Any) -> None:
    """A job's SIGINT handler: a KeyboardInterrupt, once. The terminal's Ctrl-C and the parent's
    stop may both arrive; the second must not cut short what the first started (a checkpoint, an
    IWAE's progress being saved)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _job(config: Config, run_dir: Path, options: EvalOptions, threads: int, device: str, gpu: int | None,
         stop: Any, conn: Any, echo: bool) -> None:
    """One configuration in a process of its own (`compare --jobs`): its share of the cores, its GPU
    on CUDA (then what device "auto" and "cuda" mean), no progress bars (they would interleave),
    log lines prefixed with the run's name, shown on stdout if its parent shows its own (`echo`). What it ends with goes back through `conn`: ("done",
    metrics), ("failed", the error) or ("interrupted", None). It starts with SIGINT ignored (so a
    Ctrl-C while it starts up prints no traceback) and takes it from here on; a stop asked before
    that is seen in `stop`."""
    import torch

    signal.signal(signal.SIGINT, _interrupt_once)
    if echo:  # for the rest of this process, which ends with the job
        logs.show(sys.stdout)
    try:
        try:
            if stop.is_set():
                raise KeyboardInterrupt
            if gpu is not None:
                torch.cuda.set_device(gpu)
            torch.set_num_threads(threads)  # train.threads, when set, still rules the training
            outcome = "done", _train_and_evaluate(config, run_dir, options, False,
                                                  lambda m: logs.info(f"[{run_dir.name}] {m}"), device)
        except KeyboardInterrupt:
            outcome = "interrupted", None
        except BaseException as e:  # handed to the parent, which raises it
            outcome = "failed", (e if isinstance(e, (BdvaeError, OSError)) else
                                 RuntimeError(f"{run_dir.name}: {''.join(traceback.format_exception(e))}"))
    except KeyboardInterrupt:  # a stop that landed while the outcome was being put together
        outcome = "interrupted", None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # settled: no stop may cut short telling it, or the exit
    conn.send(outcome)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process meanwhile (on the main thread; elsewhere it cannot be set):
    processes started now inherit that."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _stop(processes: list[Any], stop: Any, grace: float = 60.0) -> None:
    """Ask running jobs to stop as a Ctrl-C does (training keeps its checkpoint, an IWAE saves its
    progress), then end those still running after `grace` seconds, or at once on another Ctrl-C."""
    stop.set()
    for process in processes:
        if process.is_alive():
            if os.name == "posix":
                os.kill(process.pid, signal.SIGINT)
            else:
                process.terminate()
    deadline = time.monotonic() + grace
    try:
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # another Ctrl-C: wait no longer
        pass
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join()


def compare(base: Config, regularizers: list[str], betas: list[float], seeds: int, out: Path,
            epochs: int | None = None, options: EvalOptions = EvalOptions(), progress: bool | None = None,
            log: Callable[[str], None] = logs.info, jobs: int = 1, device: str = "auto") -> list[Entry]:
    """Train and evaluate every configuration for seeds 0 .. seeds-1 (`jobs` of them at once, in
    separate processes that share the CPU cores and, on CUDA, take the GPUs in turn); write the
    report into `out`. `device` ("auto", "cpu" or "cuda") trains and evaluates every run."""
    from bdvae.devices import device_type

    if not regularizers or not betas or seeds <= 0:
        raise BdvaeError("compare needs at least one regularizer, one beta and one seed")
    if jobs <= 0:
        raise BdvaeError(f"--jobs must be positive, got {jobs}", python=f"jobs must be positive, got {jobs}")
    on_gpu = device_type(device) == "cuda"  # a bad --device fails before anything is written
    regularizers, betas = list(dict.fromkeys(regularizers)), list(dict.fromkeys(betas))  # each configuration once
    plan = [(r, b, s) for r in regularizers for b in betas for s in range(seeds)]
    names = [run_name(*key) for key in plan]
    if len(set(names)) < len(names):
        raise BdvaeError("--beta values that print alike would share a run directory: "
                         + ", ".join(f"{b!r}" for b in betas))
    configs = {key: planned_config(base, *key, epochs) for key in plan}  # validates every value first
    if out.exists() and not out.is_dir():
        raise BdvaeError(f"--out {out}: exists and is not a directory")
    if not (out / "runs").is_dir() and (there := report_files_in(out)):
        # A report that `bdvae report` wrote there, not a comparison this one continues: keep it.
        raise BdvaeError(f"--out {out}: holds a report ({there[0]}) but no runs/ of a comparison; choose another --out",
                         python=f"out={out}: holds a report ({there[0]}) but no runs/ of a comparison; choose another out")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    run_dirs = {key: out / "runs" / run_name(*key) for key in plan}
    jobs = min(jobs, len(plan))
    if jobs == 1:
        metrics = {}
        for i, key in enumerate(plan, 1):
            log(f"[{i}/{len(plan)}] {run_dirs[key].name}")
            metrics[key] = _train_and_evaluate(configs[key], run_dirs[key], options, progress, log, device)
    else:
        metrics = _in_parallel(plan, configs, run_dirs, options, jobs, log, device, on_gpu)
    entries = [Entry(objective_name(configs[key].objective), key[1], key[2], run_dir=run_dirs[key], metrics=metrics[key])
               for key in plan]
    write_report(out, entries)
    return entries


def _in_parallel(plan: list[tuple[str, float, int]], configs: dict, run_dirs: dict, options: EvalOptions, jobs: int,
                 log: Callable[[str], None], device: str, on_gpu: bool) -> dict[tuple[str, float, int], dict[str, Any]]:
    """Every configuration in a process of its own, `jobs` at a time (spawned: a fresh interpreter,
    no forked torch thread pools), each on a GPU of its own while there are enough (`on_gpu`). The
    first failure, or a Ctrl-C, stops the jobs running and starts no other, then is raised; runs
    finished by then stay on disk, and the stopped ones can be resumed, by the next compare."""
    import multiprocessing
    from multiprocessing.connection import wait

    import torch

    threads = max(1, (os.cpu_count() or 1) // jobs)
    spawn = multiprocessing.get_context("spawn")
    free: list[int | None] = gpu_slots(jobs, torch.cuda.device_count()) if on_gpu else [None] * jobs
    where = f", on {min(jobs, torch.cuda.device_count())} GPUs" if on_gpu else ""
    log(f"{len(plan)} runs, {jobs} at a time, {threads} threads each{where}")
    stop = spawn.Event()
    waiting = list(plan)
    running: dict[Any, tuple[tuple[str, float, int], Any, int | None]] = {}  # connection -> (key, process, GPU)
    metrics = {}
    try:
        while waiting or running:
            while waiting and free:
                key, gpu = waiting.pop(0), free.pop(0)
                receive, send = spawn.Pipe(duplex=False)
                process = spawn.Process(target=_job, args=(configs[key], run_dirs[key], options, threads, device, gpu,
                                                           stop, send, logs.shown()))
                with _sigint_ignored():
                    process.start()
                send.close()  # the job's end only: its exit is then an end of file here
                running[receive] = key, process, gpu
            for conn in wait(list(running)):
                key, process, gpu = running.pop(conn)
                try:
                    outcome, value = conn.recv()
                except EOFError:  # it died without a word: killed, out of memory
                    process.join()
                    raise BdvaeError(f"{run_dirs[key].name}: its process ended with exit code {process.exitcode}") from None
                process.join()
                free.append(gpu)
                if outcome == "interrupted":
                    raise KeyboardInterrupt
                if outcome == "failed":
                    raise value
                metrics[key] = value
                log(f"[{len(metrics)}/{len(plan)}] {run_dirs[key].name} done")
    finally:
        _stop([process for _, process, _ in running.values()], stop)
    return metrics
