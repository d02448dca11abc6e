"""The `bdvae` command (`python -m bdvae`, and the `bdvae` script): parses arguments and calls
the library; nothing else.

``COMMANDS`` maps each sub-command (``bdvae sampler fit``: a dict within it) to a plain function
with typed keyword arguments, which checks what only a command line can get wrong and calls the
library; ``build_parser`` declares the flags, whose names are those arguments; ``main`` parses
and calls. Every BdvaeError (bad input, bad data, an existing run directory) becomes one line on
stderr and exit code 2, as do argument errors. Heavy imports (torch) happen inside the function
that needs them: `bdvae --help` imports none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bdvae.errors import BdvaeError, check_seed, out_of_memory


class _Parser(argparse.ArgumentParser):
    """argparse that reports an error in one line (no usage block) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("bdvae").strip()  # "train", "data fetch", or "" at the top
        raise BdvaeError(f"{command}: {message}" if command else message)


def _config(preset: str | None, config_file: Path | None, overrides: list[str] | None, data_dir: Path | None):
    """The config of --preset, --config, --set and --data-dir (train and compare share them)."""
    from bdvae import config as config_lib

    overrides = list(overrides or [])
    if data_dir is not None:
        overrides.append(f"data.data_dir={json.dumps(str(data_dir))}")  # a JSON string is a TOML string
    return config_lib.load(config_file, overrides, preset=preset)


def _check_out(path: Path, overwrite: bool, suffix: str | None = ".png") -> None:
    """--out must name a file (with `suffix`, if given) in an existing folder, new unless `overwrite`."""
    if path.is_dir():
        raise BdvaeError(f"--out {path}: is a folder; name a file")
    if suffix is not None and path.suffix.lower() != suffix:
        raise BdvaeError(f"--out {path}: must be a {suffix} file")
    if not path.parent.is_dir():
        raise BdvaeError(f"--out {path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise BdvaeError(f"--out {path}: file exists; pass --overwrite to replace it")


def default_run_dir(config: Any, preset: str | None) -> Path:
    """runs/[PRESET-]REGULARIZER-betaBETA[-agg-AGGREGATEWEIGHT]-seedSEED: what `train` writes to without
    --out, so that a preset or an aggregate term does not land on the default run's folder."""
    objective = config.objective
    name = f"{objective.regularizer}-beta{objective.beta:g}"
    if objective.aggregate is not None:
        name += f"-agg-{objective.aggregate}{objective.aggregate_weight:g}"
    return Path("runs") / f"{preset + '-' if preset else ''}{name}-seed{config.train.seed}"


def _csv(text: str, kind: Callable[[str], object], what: str) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BdvaeError(f"{what}: expected a comma-separated list, got {text!r}") from None
    if not values:
        raise BdvaeError(f"{what}: empty list")
    return values


def _progress(quiet: bool) -> bool | None:
    """The library's `progress`: a bar on a terminal unless --quiet."""
    return None if not quiet else False


def _shown(where: dict[str, Any], figure: Any) -> str | None:
    """A figure's value as the terminal table shows it, "± standard error" beside a mean that has
    one; None where it does not apply."""
    from bdvae.metrics import figure_value

    try:
        value = figure_value(where, figure.path)
    except KeyError:
        if not figure.optional:
            raise
        return None
    decimals = figure.decimals if figure.row_decimals is None else figure.row_decimals
    if value is None or decimals is None:
        return value
    text = f"{value:.{decimals}f}"
    parent = figure_value(where, figure.path[:-1]) if figure.path[-1] == "mean" else None
    return f"{text} ± {parent['std_error']:.{decimals}f}" if parent and "std_error" in parent else text


def scored_against(where: dict[str, Any], test_images: int) -> str:
    """How many decoded samples the sample-quality figures of `where` (the run's metrics or one
    sampler's) were scored against how many test images: they depend on both."""
    return f"{where['sample_quality']['samples']} samples against {test_images} test images"


def format_table(m: dict[str, Any]) -> str:
    """The figures of a metrics dict (metrics.FIGURES, in its order), one per line, for the
    terminal: the run's, then each sampler's (the prior's sample quality among the run's). Each
    group of sample-quality figures opens with a row that says how many samples it scored
    against how many test images."""
    from bdvae.metrics import FIGURES

    def group(figures: list[Any], where: dict[str, Any], name: str, value: str | None = None) -> list[tuple[str, Any]]:
        """A group of rows: a heading row with the group's name (and `value`), then its figures indented."""
        return [(name, value or ""), *((f"  {f.row}", _shown(where, f)) for f in figures)]

    quality = [f for f in FIGURES if f.row and f.scope == "both"]
    own = [f for f in FIGURES if f.row and f.scope == "sampler"]  # a sampler's own figures lead its rows
    rows = [(f.row.format_map(m), _shown(m, f)) for f in FIGURES if f.row and f.scope == "run"]
    if m["sample_quality"] is None:
        rows.append(("samples", "no sample-quality scores: the reference classifier knows 32x32 MNIST only"))
    else:
        rows += group(quality, m, "sample quality, z ~ N(0, I)", scored_against(m, m["test_images"]))
    for name, entry in m.get("samplers", {}).items():
        scored = name != "prior" and entry.get("sample_quality") is not None
        rows += group(own + (quality if scored else []), entry, f"sampler {name}",
                      scored_against(entry, m["test_images"]) if scored else None)
    rows = [(label, value) for label, value in rows if value is not None]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in rows)


# ---------------------------------------------------------------------------------------------
# The commands


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line less its --nproc and value (--nproc N, --nproc=N, or a prefix of the flag
    that argparse took for it): what each of the launched processes runs."""
    out, skip = [], False
    for token in argv:
        flag = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(flag) > 2 and "--nproc".startswith(flag):
            skip = "=" not in token
        else:
            out.append(token)
    return out


def train(*, preset: str | None, config_file: Path | None, overrides: list[str] | None, out: Path | None,
          data_dir: Path | None, overwrite: bool, resume: Path | None, device: str, nproc: int | None,
          quiet: bool, argv: list[str]) -> None:
    from bdvae.devices import check_gpus
    from bdvae.distributed import is_main_process, launch, launched_by_torchrun
    from bdvae.rundir import check_new, check_resumable
    from bdvae.training import resume as resume_run, train as train_run

    if nproc is not None and not 1 <= nproc <= 1024:
        raise BdvaeError(f"--nproc must be between 1 and 1024, got {nproc}")
    if nproc is not None and launched_by_torchrun():
        raise BdvaeError("--nproc: this process was started by torchrun already; use one or the other")
    check_gpus(device, nproc or 1)  # a bad --device, or too few GPUs, fail here, before any process starts
    if resume is not None:
        given = [flag for flag, value in (("--preset", preset), ("--config", config_file), ("--set", overrides),
                                          ("--out", out), ("--data-dir", data_dir), ("--overwrite", overwrite)) if value]
        if given:
            raise BdvaeError(f"--resume continues a run with its own config; it takes no {', '.join(given)}")
        if (nproc or 1) > 1:  # rank 0 of the launched processes prints the run directory
            check_resumable(resume)
            launch(nproc, _without_nproc(argv))
            return
        resume_run(resume, progress=_progress(quiet), device=device)
        if is_main_process():
            print(f"run directory: {resume}")
        return
    config = _config(preset, config_file, overrides, data_dir)
    out = out or default_run_dir(config, preset)
    if (nproc or 1) > 1:
        check_new(Path(out), overwrite)  # fail before starting the processes
        launch(nproc, _without_nproc(argv))  # every process works out the same --out from the config
        return
    train_run(config, Path(out), overwrite=overwrite, progress=_progress(quiet), device=device)
    if is_main_process():
        print(f"run directory: {out}")


def sample(*, run: Path, n: int, out: Path, seed: int | None, sampler: str, overwrite: bool) -> None:
    from bdvae.api import check_draw, load_run
    from bdvae.pictures import save_grid
    from bdvae.samplers import parse_name

    check_draw(n, seed)
    sampler = parse_name(sampler).name  # an unknown name fails before anything is read
    _check_out(out, overwrite)
    save_grid(load_run(run).sample(n, seed=seed, sampler=sampler), out)
    source = "N(0, I)" if sampler == "prior" else f"the fitted sampler {sampler}"
    print(f"wrote {n} samples from {source} to {out}")


def sampler_fit(*, run: Path, kind: str, components: int | None, regularizer: str | None, seed: int | None,
                fit_on: str | None, overwrite: bool) -> None:
    import dataclasses

    from bdvae.api import load_run
    from bdvae.rundir import sampler_paths
    from bdvae.samplers import fitted_kinds, parse_name

    named = parse_name(kind)  # "gmm" or "gmm-20"; the flags below override what a name spells
    given = {key: value for key, value in (("components", components), ("regularizer", regularizer),
                                           ("seed", seed), ("fit_on", fit_on)) if value is not None}
    options = dataclasses.replace(named, **given)
    if "-" in kind and options.name != named.name:
        raise BdvaeError(f"sampler fit: {kind} and the options given name another sampler, {options.name}")
    if options.kind == "prior":
        raise BdvaeError(f"sampler fit: the prior N(0, I) needs no fitting; fit {fitted_kinds()}")
    if (components is not None and options.kind != "gmm") or (regularizer is not None and options.kind != "two_stage"):
        raise BdvaeError(f"sampler fit: --components is for gmm and --regularizer for two_stage, not {options.kind}")
    fitted = load_run(run).fit_sampler(kind, overwrite=overwrite, **given)
    print(f"fitted {options.name} ({fitted.latent_dim} latent dimensions); wrote {sampler_paths(run, options.name)[0]}")
    print(f"draw from it with: bdvae sample {run} --sampler {options.name} --out samples-{options.name}.png")


def sampler_list(*, run: Path) -> None:
    from bdvae.rundir import check_finished, fitted_names, read_facts

    check_finished(run)
    print(f"{'sampler':<20} {'fitted on':<26} {'seed':>5} {'seconds':>8}")
    print(f"{'prior':<20} {'(N(0, I): nothing to fit)':<26} {'-':>5} {'-':>8}")
    for name in fitted_names(run):
        facts = read_facts(run, name)
        fit = facts["fit"]
        on = f"{fit['latents']} {'means' if fit['fit_on'] == 'mean' else 'z ~ q(z|x)'}"
        print(f"{name:<20} {on:<26} {fit['seed']:>5} {facts.get('seconds', 0):>8.1f}")


def reconstruct(*, run: Path, n: int, ncol: int, out: Path, overwrite: bool) -> None:
    from bdvae.api import load_run
    from bdvae.data import load_dataset
    from bdvae.pictures import save_grid, side_by_side_rows

    if n <= 0 or ncol <= 0:
        raise BdvaeError(f"-n and --ncol must be positive, got {n} and {ncol}")
    _check_out(out, overwrite)
    trained = load_run(run)
    x = load_dataset(trained.config.data).test_images[:n]
    save_grid(side_by_side_rows(x, trained.reconstruct, ncol), out, ncol=ncol)
    print(f"wrote {len(x)} test images (odd rows) and their reconstructions (even rows) to {out}")


def _eval_options(samplers: str, **flags: Any) -> Any:
    """EvalOptions from the evaluation flags (_add_evaluation), --samplers split at its commas."""
    from bdvae.options import EvalOptions

    return EvalOptions(samplers=tuple(_csv(samplers, str, "--samplers")), **flags)


def evaluate(*, run: Path, k: int, samples: int, test_size: int | None, seed: int, max_batch: int,
             pictures: bool, samplers: str, dtype: str, device: str, quiet: bool, as_json: bool) -> None:
    from bdvae.evaluation import evaluate_run
    from bdvae.rundir import METRICS_FILE, fitted_names

    options = _eval_options(samplers, k=k, samples=samples, test_size=test_size, seed=seed, max_batch=max_batch,
                            pictures=pictures, dtype=dtype)
    result = evaluate_run(run, options, progress=_progress(quiet), device=device)
    if as_json:  # stdout holds the JSON alone; what the log says went to stderr
        print(json.dumps(result))
        return
    print(format_table(result))
    print(f"wrote {run / METRICS_FILE} ({result['seconds']:.0f} s)")
    if unscored := [name for name in fitted_names(run) if name not in result["samplers"]]:
        print(f"fitted in the run but not scored: {', '.join(unscored)} (--samplers {','.join(unscored)} scores them)")


def compare(*, regularizers: str, beta: str, seeds: int, epochs: int | None, out: Path, preset: str | None,
            config_file: Path | None, overrides: list[str] | None, data_dir: Path | None, k: int, samples: int,
            test_size: int | None, samplers: str, dtype: str, device: str, jobs: int, quiet: bool) -> None:
    from bdvae.comparison import compare as compare_runs
    from bdvae.reporting import REPORT_HTML, REPORT_MD

    base = _config(preset, config_file, overrides, data_dir)
    regularizer_list = _csv(regularizers, str, "--regularizers")
    betas = _csv(beta, float, "--beta")
    if seeds <= 0 or (epochs is not None and epochs <= 0):
        raise BdvaeError(f"--seeds and --epochs must be positive, got {seeds} and {epochs}")
    options = _eval_options(samplers, k=k, samples=samples, test_size=test_size, dtype=dtype)
    compare_runs(base, regularizer_list, betas, seeds, out, epochs=epochs, options=options, progress=_progress(quiet),
                 jobs=jobs, device=device)
    print(f"wrote {out / REPORT_MD} and {out / REPORT_HTML}")


def report(*, runs: list[Path], out: Path, overwrite: bool) -> None:
    from bdvae.reporting import report as write_report

    md, page = write_report(runs, out, overwrite)
    print(f"wrote {md} and {page}")


def classifier_train(*, out: Path, epochs: int, seed: int, data_dir: Path | None, overwrite: bool, quiet: bool) -> None:
    from bdvae.classifier import save_classifier, train_reference

    check_seed(seed, "--seed")
    _check_out(out, overwrite, suffix=None)
    if epochs <= 0:
        raise BdvaeError(f"--epochs must be positive, got {epochs}")
    model, facts = train_reference(data_dir, epochs=epochs, seed=seed, progress=not quiet)
    save_classifier(model, out, facts)
    print(f"test accuracy {facts['test_accuracy']:.2%}; wrote {out}")


def classifier_scales(*, data_dir: Path | None) -> None:
    from bdvae.classifier import reference_scores
    from bdvae.config import DataConfig
    from bdvae.data import load_dataset

    data = load_dataset(DataConfig(name="mnist", data_dir=None if data_dir is None else str(data_dir)))
    scores = reference_scores(data)
    heading = f"reference set, against {len(data.test_images)} test images"
    width = max(len(heading), *map(len, scores))
    print(f"{heading:<{width}} {'Fréchet':>9} {'score':>6} {'entropy':>7} {'precision':>9} {'recall':>6}")
    for name, s in scores.items():
        print(f"{name:<{width}} {s['frechet_distance']:>9.2f} {s['classifier_score']:>6.2f} {s['class_entropy']:>7.3f} "
              f"{s['precision']:>9.3f} {s['recall']:>6.3f}")


def config_show(*, preset: str | None, config_file: Path | None, overrides: list[str] | None,
                data_dir: Path | None) -> None:
    from bdvae.config import show

    print(show(_config(preset, config_file, overrides, data_dir), preset=preset), end="")


def completion(*, shell: str) -> None:
    try:
        import shtab
    except ImportError:
        raise BdvaeError("completion needs the shtab package: pip install 'bdvae[completion]' (or pip install shtab)") from None
    print(shtab.complete(build_parser(), shell=shell), end="")


def data_fetch(*, name: str, data_dir: Path | None, source_dir: Path | None, force: bool) -> None:
    from bdvae.data import fetch

    # Every array is checked again, also when the cache was already there.
    folder = fetch(name, data_dir=data_dir, source_dir=source_dir, force=force or bool(source_dir), recheck=True)
    print(f"{name}: verified arrays in {folder}")


Command = Callable[..., None]
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "train": train,
    "sample": sample,
    "sampler": {"fit": sampler_fit, "list": sampler_list},
    "reconstruct": reconstruct,
    "evaluate": evaluate,
    "compare": compare,
    "report": report,
    "classifier": {"train": classifier_train, "scales": classifier_scales},
    "config": {"show": config_show},
    "completion": completion,
    "data": {"fetch": data_fetch},
}


# ---------------------------------------------------------------------------------------------
# The flags: each one's dest is the name of its command function's argument

DEFAULT_COMPONENTS = 10  # samplers.DEFAULT_COMPONENTS, spelled here so that --help needs no torch
DEVICES = ("auto", "cpu", "cuda")  # devices.DEVICES, spelled here so that --help needs no torch
DEVICE_HELP = "auto (a CUDA GPU when there is one), cpu or cuda (default auto)"


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_data_dir(where: Any) -> None:
    """--data-dir on a parser or an argument group."""
    where.add_argument("--data-dir", type=Path, help="the dataset cache folder (the same as --set data.data_dir=...; "
                       "default: $BDVAE_DATA_DIR, else $XDG_CACHE_HOME/bdvae, else ~/.cache/bdvae)")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="a run directory written by `bdvae train`")


def _add_config(p: argparse.ArgumentParser, what: str) -> None:
    """--preset, --config, --set and --data-dir, which train, compare and config show share: the
    config of `what`."""
    from bdvae.config import preset_names  # the config module imports no torch

    group = p.add_argument_group(f"configuration of {what} (`bdvae config show` prints every key, its default and meaning)")
    group.add_argument("--preset", metavar="NAME",
                       help=f"start from a config shipped with bdvae: {', '.join(preset_names())} "
                            "(default: reference, the defaults; --config and --set apply on top)")
    group.add_argument("--config", type=Path, dest="config_file", metavar="CONFIG",
                       help="a TOML file with [data], [model], [objective], [train] tables, laid over the preset")
    group.add_argument("--set", action="append", dest="overrides", metavar="SECTION.KEY=VALUE",
                       help="override one config value, read as TOML (repeatable), e.g. --set objective.beta=2")
    _add_data_dir(group)


def _add_evaluation(p: argparse.ArgumentParser, fields: tuple[str, ...], device: str) -> None:
    """The flags of the EvalOptions `fields`, each declared from its field: the default, the choices
    and, from the field's docstring, the help; then --device, `device` saying what runs there."""
    import dataclasses

    from bdvae.config import docstrings
    from bdvae.options import DTYPES, EvalOptions  # neither imports torch

    group = p.add_argument_group("evaluation (bdvae.options.EvalOptions)")
    defaults = {f.name: f.default for f in dataclasses.fields(EvalOptions)}
    for name in fields:
        default, meaning = defaults[name], docstrings(EvalOptions)[name].replace("%", "%%").rstrip(".")
        lower = meaning[0].lower() + meaning[1:]  # after a word of the flag's own
        if name == "pictures":  # on by default: the flag turns it off
            group.add_argument("--no-pictures", dest="pictures", action="store_false", help=f"do not {lower}")
        elif name == "samplers":
            shown = ",".join(default)
            group.add_argument("--samplers", default=shown, help=f"comma-separated: {lower} (default {shown})")
        elif name == "dtype":
            group.add_argument("--dtype", default=default, choices=DTYPES, help=f"{meaning} (default {default})")
            # Its first name, kept for the scripts that use it; hidden, since "precision" now means
            # only the sample-quality metric.
            group.add_argument("--precision", dest="dtype", choices=DTYPES, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            flag = "-k" if name == "k" else f"--{name.replace('_', '-')}"
            shown = "" if default is None else f" (default {default})"
            group.add_argument(flag, dest=name, type=int, default=default, metavar="N", help=f"{meaning}{shown}")
    group.add_argument("--device", default="auto", choices=DEVICES, help=f"{device}: {DEVICE_HELP}")


def build_parser() -> argparse.ArgumentParser:
    from bdvae._version import __version__
    from bdvae.data import KNOWN  # the data module imports no torch either

    parser = _Parser(prog="bdvae", description="VAEs regularized by the Bhattacharyya distance to N(0, I).")
    parser.add_argument("--version", action="version", version=f"bdvae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("train", help="train a VAE into a run directory")
    p.add_argument("--out", type=Path, help="run directory (default: runs/[PRESET-]REGULARIZER-betaBETA[-agg-AGGREGATEWEIGHT]-seedSEED)")
    _add_overwrite(p, "the files of an existing run directory")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run from its newest good checkpoint")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N data-parallel processes on this machine (launches torchrun)")
    _add_quiet(p)
    _add_config(p, "the run")

    p = commands.add_parser("sample", help="decode draws of z (from N(0, I) or a fitted sampler) into a grid of images")
    _add_run(p)
    p.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws (default: random)")
    p.add_argument("--sampler", default="prior", help="prior (N(0, I), default) or a sampler fitted in the run "
                   "with `bdvae sampler fit`, e.g. gmm-10, two_stage or flow")
    _add_overwrite(p, "an existing --out file")

    p = commands.add_parser("sampler", help="latent samplers fitted to a run's aggregate posterior q(z)")
    sampler_commands = p.add_subparsers(dest="sampler_command", required=True, parser_class=_Parser)
    p = sampler_commands.add_parser("fit", help="fit a sampler on the run's training latents; store it in RUN/samplers/")
    _add_run(p)
    p.add_argument("kind", help="gmm (a Gaussian mixture, full covariances), two_stage (a second VAE) or flow "
                   "(a masked autoregressive flow; needs zuko); a name such as gmm-20 or two_stage-kl spells its option")
    p.add_argument("--components", type=int, help=f"gmm: mixture components (default {DEFAULT_COMPONENTS})")
    p.add_argument("--regularizer", help="two_stage: the second VAE's regularizer (default bhattacharyya)")
    p.add_argument("--seed", type=int, help="seed of the draws z ~ q(z|x) and of the fit (default 0)")
    p.add_argument("--fit-on", choices=("sample", "mean"),
                   help="sample: one z ~ q(z|x) per training image (default); mean: the posterior means")
    _add_overwrite(p, "a sampler of that name fitted before")
    p = sampler_commands.add_parser("list", help="the samplers fitted in a run directory")
    _add_run(p)

    p = commands.add_parser("reconstruct", help="test images and their reconstructions, in alternating rows")
    _add_run(p)
    p.add_argument("-n", type=int, default=32, help="number of test images (default 32)")
    p.add_argument("--ncol", type=int, default=8, help="images per row (default 8)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    _add_overwrite(p, "an existing --out file")

    p = commands.add_parser("evaluate", help="test-set metrics of a run: likelihood, divergences, prior match, samples")
    _add_run(p)
    _add_quiet(p)
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="print the metrics as one JSON object on stdout, as the run directory keeps them, instead of the table "
                        "(what the evaluation says as it goes is on stderr)")
    _add_evaluation(p, ("k", "samples", "test_size", "seed", "max_batch", "pictures", "samplers", "dtype"),
                    device="where the IWAE runs (the rest of the evaluation stays on the CPU)")

    p = commands.add_parser("compare", help="train and evaluate regularizers x betas x seeds; write a report")
    p.add_argument("--regularizers", default="bhattacharyya,kl", help="comma-separated (default bhattacharyya,kl)")
    p.add_argument("--beta", default="1", help="comma-separated betas (default 1); several draw rate-distortion curves")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per configuration (default 3)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the config's)")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train and evaluate N configurations at once, in separate processes (default 1)")
    _add_quiet(p)
    _add_evaluation(p, ("k", "samples", "test_size", "samplers", "dtype"), device="where the runs train and their IWAE runs")
    _add_config(p, "every run (their base, which --regularizers, --beta, --seeds and --epochs vary)")

    p = commands.add_parser("report", help="the comparison report of runs trained and evaluated apart")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="evaluated run directories of one model (their weights are not needed)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.html and rate_distortion.png")
    _add_overwrite(p, "a report already in --out")

    p = commands.add_parser("classifier", help="the reference MNIST classifier behind the sample-quality scores")
    classifier_commands = p.add_subparsers(dest="classifier_command", required=True, parser_class=_Parser)
    p = classifier_commands.add_parser("train", help="train it reproducibly on MNIST and save it as safetensors")
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    p.add_argument("--epochs", type=int, default=4, help="epochs (default 4, as the shipped weights)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0, as the shipped weights)")
    _add_data_dir(p)
    _add_overwrite(p, "an existing --out file")
    _add_quiet(p)
    p = classifier_commands.add_parser("scales", help="the sample-quality scores of reference image sets")
    _add_data_dir(p)

    p = commands.add_parser("config", help="the configuration")
    config_commands = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    p = config_commands.add_parser("show", help="print the resolved config as TOML, each key with its default and meaning")
    _add_config(p, "what to show")

    p = commands.add_parser("completion", help="print a shell's completion script for bdvae, e.g. "
                            "source <(bdvae completion bash) in ~/.bashrc")
    p.add_argument("shell", choices=("bash", "zsh", "tcsh"))

    p = commands.add_parser("data", help="datasets")
    data_commands = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data_commands.add_parser("fetch", help="download, verify and cache a dataset")
    p.add_argument("name", choices=sorted(KNOWN))
    _add_data_dir(p)
    p.add_argument("--source-dir", type=Path, help="take the four IDX files from this folder instead of downloading")
    p.add_argument("--force", action="store_true", help="fetch again even if the cache is filled")
    return parser


def _report(message: str) -> None:
    """The one-line error on stderr; in a process of a multi-process run, as distributed.py says."""
    if "RANK" in os.environ:  # started by torchrun (the only case that imports torch for an error)
        from bdvae.distributed import report_error

        report_error(message)
    else:
        print(f"bdvae: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from bdvae import logs

    try:
        args = vars(build_parser().parse_args(argv))
        name = args.pop("command")
        command: Any = COMMANDS[name]
        if isinstance(command, dict):  # `bdvae sampler fit`: its parser's dest is sampler_command
            command = command[args.pop(f"{name}_command")]
        if command is train:  # --nproc launches the processes with the command line as it was given
            args["argv"] = list(sys.argv[1:] if argv is None else argv)
        with logs.showing(sys.stderr if args.get("as_json") else sys.stdout):  # the library's log is the command's
            command(**args)
    except BdvaeError as e:
        _report(e.command_line)  # the line that names flags and commands
        return 2
    except OSError as e:  # a full disk, a folder that became unwritable: say which file, no traceback
        where = f"{e.filename}: " if e.filename else ""
        _report(f"{where}{e.strerror or e}")
        return 2
    except (MemoryError, RuntimeError) as e:  # an allocation the checks before it did not foresee
        if (line := out_of_memory(e)) is None:
            raise
        _report(line)
        return 2
    except KeyboardInterrupt:
        # One line, not one per process: rank 0 of a torchrun job says it, or `launch` for its workers.
        if os.environ.get("RANK", "0") == "0" and "BDVAE_LAUNCHED" not in os.environ:
            print("bdvae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
