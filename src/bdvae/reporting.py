"""The comparison report: OUT/report.md (pictures linked) and OUT/report.html (pictures embedded).

Both give the same sections in the same order, from one list (sections): what the runs are
(dataset, image shape, preset and architecture, epochs, likelihood, K, sample counts, bdvae
versions, dates), the figures in three tables by theme (likelihood and reconstruction; prior
match; sample quality), notes, the fitted samplers' table, the rate-distortion plot
OUT/rate_distortion.png, and the pictures of each configuration (its first seed) side by side.
A cell is the mean ± std over seeds; a column header gives its unit and direction (↓ lower is
better, ↑ higher), and the best value of a column with a direction is in bold. Negative numbers
take the minus sign U+2212, in the tables and in the text.

`bdvae compare` writes it for the runs it trains; `bdvae report` for runs trained and evaluated
apart (read_entries), which may lie anywhere: the Markdown links them relative to OUT.
"""

from __future__ import annotations

import base64
import html
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bdvae import config as config_lib
from bdvae import pictures, rundir
from bdvae._version import __version__
from bdvae.config import Config
from bdvae.data import known_image_shape
from bdvae.errors import BdvaeError
from bdvae.files import write_text
from bdvae.metrics import FIGURES, Figure, missing_figures


@dataclass(frozen=True)
class Entry:
    """One configuration and seed of a comparison: where its run lives and its evaluation.
    `regularizer` names the objective's terms (objective_name): the regularizer, and the aggregate
    term with its weight where the run has one."""

    regularizer: str
    beta: float
    seed: int
    run_dir: Path
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.regularizer} β={self.beta:g} seed {self.seed}"


# The report's columns, from the one table of reported figures: the run's (sample quality: the
# prior's), and each sampler's, read from metrics["samplers"][NAME].
COLUMNS: tuple[Figure, ...] = tuple(f for f in FIGURES if f.column and f.decimals is not None and f.scope != "sampler")
SAMPLER_COLUMNS: tuple[Figure, ...] = tuple(f for f in FIGURES if f.column and f.decimals is not None and f.scope != "run")
# The run's columns in a table per theme (metrics.Figure.theme), so that no table is wider than a page.
THEMES = {"likelihood": "Likelihood and reconstruction", "prior match": "Prior match: q(z) against N(0, I)",
          "sample quality": "Sample quality of z ~ N(0, I)"}
REPORT_MD, REPORT_HTML, RATE_DISTORTION = "report.md", "report.html", "rate_distortion.png"
REPORT_FILES = (REPORT_MD, REPORT_HTML, RATE_DISTORTION)  # what write_report puts in OUT
PICTURES = (("originals", rundir.ORIGINALS), ("reconstructions", rundir.RECONSTRUCTIONS),
            ("samples from N(0, I)", rundir.SAMPLES), ("latent histograms", rundir.LATENT_HISTOGRAMS))
MINUS = "\u2212"  # the one minus sign of the report


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def objective_name(objective: Any) -> str:
    """How a report names an objective (a config.ObjectiveConfig) beside its beta: the regularizer,
    and its aggregate term and weight if any, e.g. "bhattacharyya + aggregate mmd ×100"."""
    if objective.aggregate is None:
        return objective.regularizer
    return f"{objective.regularizer} + aggregate {objective.aggregate} ×{objective.aggregate_weight:g}"


def group(entries: Sequence[Entry]) -> dict[tuple[str, float], list[Entry]]:
    """Entries by (regularizer, beta), in the order first seen."""
    groups: dict[tuple[str, float], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.regularizer, e.beta), []).append(e)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cells(metrics: Sequence[dict[str, Any]], columns: Sequence[Figure]) -> dict[str, tuple[float, float] | None]:
    """(mean, std) over the seeds' metrics per column; None where no seed has the value."""
    cells: dict[str, tuple[float, float] | None] = {}
    for f in columns:
        values = [v for m in metrics if (v := _get(m, f.path)) is not None]
        cells[f.column] = mean_std(values) if values else None
    return cells


def summary_rows(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """One row per configuration: its name, seed count and (mean, std) per column (None if absent)."""
    return [{"regularizer": reg, "beta": beta, "seeds": len(members), "cells": _cells([e.metrics for e in members], COLUMNS)}
            for (reg, beta), members in group(entries).items()]


def sampler_names(entries: Sequence[Entry]) -> list[str]:
    """Every sampler some run was evaluated with, in the order first seen (the prior first)."""
    return list(dict.fromkeys(name for e in entries for name in e.metrics.get("samplers", {})))


def sampler_rows(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """One row per configuration and sampler, over the seeds evaluated with that sampler."""
    rows = []
    for (reg, beta), members in group(entries).items():
        for name in sampler_names(members):
            found = [m["samplers"][name] for e in members if name in (m := e.metrics).get("samplers", {})]
            rows.append({"regularizer": reg, "beta": beta, "sampler": name, "seeds": len(found),
                         "cells": _cells(found, SAMPLER_COLUMNS)})
    return rows


# ---------------------------------------------------------------------------------------------
# Numbers and tables


def number(value: float, decimals: int) -> str:
    """`value` with `decimals` decimals and the minus sign U+2212; never "−0.00"."""
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text.replace("-", MINUS)


def minus_signs(text: str) -> str:
    """A text with each hyphen-minus that stands for a minus (before a digit or "ln", not inside a
    word such as gmm-10) made U+2212."""
    return re.sub(r"(?<![\w)\]])-(?=\.?\d|ln\b)", MINUS, text)


def _cell(value: tuple[float, float] | None, decimals: int, seeds: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{number(mean, decimals)} ± {number(std, decimals)}" if seeds > 1 else number(mean, decimals)


@dataclass(frozen=True)
class Table:
    """A table of the report: column headers (a name with its direction arrow, and a unit, maybe
    empty), the rows' cell texts, and which cells hold their column's best value."""

    header: list[tuple[str, str]]
    rows: list[list[str]]
    best: list[list[bool]]


def heading(f: Figure) -> tuple[str, str]:
    """A figure's column header: its name with its direction arrow, and its unit."""
    return (f"{f.column} {f.better}" if f.better else f.column), f.unit


def _best(rows: list[dict[str, Any]], f: Figure) -> list[bool]:
    """Which rows hold the best mean of column `f` as shown (ties all count); none where the column
    has no direction or fewer than two rows have a value to compare."""
    shown = [round(c[0], f.decimals) if (c := r["cells"][f.column]) else None for r in rows]
    values = [v for v in shown if v is not None]
    if not f.better or len(values) < 2:
        return [False] * len(rows)
    best = min(values) if f.better == "↓" else max(values)
    return [v == best for v in shown]


def table(rows: list[dict[str, Any]], columns: Sequence[Figure]) -> Table:
    """The rows (summary_rows or sampler_rows) in `columns`, led by the configuration's name
    (and its sampler, for a sampler row) and seed count. A column no row has a value for is left
    out (runs evaluated before bdvae measured it)."""
    columns = [f for f in columns if any(r["cells"][f.column] is not None for r in rows)]
    lead = ["regularizer", "β", *(["sampler"] if rows and "sampler" in rows[0] else []), "seeds"]
    marks = [_best(rows, f) for f in columns]
    return Table(
        header=[(name, "") for name in lead] + [heading(f) for f in columns],
        rows=[[r["regularizer"], f"{r['beta']:g}", *([r["sampler"]] if "sampler" in r else []), str(r["seeds"]),
               *(_cell(r["cells"][f.column], f.decimals, r["seeds"]) for f in columns)] for r in rows],
        best=[[False] * len(lead) + [m[i] for m in marks] for i in range(len(rows))])


def theme_columns(theme: str) -> tuple[Figure, ...]:
    return tuple(f for f in COLUMNS if f.theme == theme)


def summary_line(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seeds"] for r in rows})
    spread = "mean ± std over seeds" if seeds[-1] > 1 else "one seed, so no spread over seeds"
    return (f"{len(rows)} configuration{'s' if len(rows) != 1 else ''}, "
            f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} each; "
            f"{spread}; ↓ lower is better, ↑ higher is better, the best of each such column in bold; "
            "figures per test image.")


def markdown_table(t: Table) -> str:
    header = [f"{name} ({unit})" if unit else name for name, unit in t.header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"**{v}**" if b else v for v, b in zip(row, best)) + " |" for row, best in zip(t.rows, t.best)]
    return "\n".join(lines)


def save_rate_distortion(rows: list[dict[str, Any]], path: Path) -> None:
    pictures.save_figure(rate_distortion_figure(rows), path)


def rate_distortion_figure(rows: list[dict[str, Any]]):
    """Rate (KL of the posteriors to the prior) against distortion (reconstruction NLL): one point
    per configuration with ±1 std bars over seeds; the betas of one regularizer joined as a curve,
    each point labelled with its β where the rows' betas differ. The legend sits below the axes,
    where it cannot hide a point."""
    plt = pictures.pyplot()
    rate, distortion = "KL", "recon NLL"
    regularizers = list(dict.fromkeys(r["regularizer"] for r in rows))
    betas = sorted({r["beta"] for r in rows})
    label_betas = len(betas) > 1
    fig, ax = plt.subplots(figsize=(6, 4.5 + 0.2 * len(regularizers)), constrained_layout=True)
    for reg in regularizers:
        points = sorted((r for r in rows if r["regularizer"] == reg and r["cells"][rate] and r["cells"][distortion]),
                        key=lambda r: r["beta"])
        xs = [r["cells"][rate] for r in points]
        ys = [r["cells"][distortion] for r in points]
        ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                    marker="o", capsize=3, label=reg, linestyle="-" if len(points) > 1 else "none")
        for r, x, y in zip(points, xs, ys):
            if label_betas:
                ax.annotate(f"β={r['beta']:g}", (x[0], y[0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("rate: KL(q(z|x) || N(0, I)) per image (nats)")
    ax.set_ylabel("distortion: reconstruction NLL per image (nats)")
    ax.set_title("rate–distortion on the test set" + ("" if label_betas or not betas else f", β = {betas[0]:g}"))
    ax.margins(0.12)  # room for the β labels at the edges
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------
# What the runs are: the report's header, from their config.toml, run.json and metrics.json


def _config(run_dir: Path) -> Config | None:
    return rundir.read_config(run_dir) if (Path(run_dir) / rundir.CONFIG_FILE).is_file() else None


def preset_of(config: Config) -> tuple[str, list[str]]:
    """The shipped preset nearest to `config` and the keys in which they differ (none: it is that
    preset), leaving out what a report varies (regularizer, beta, seed) and the machine's keys."""
    without = config_lib.MACHINE_KEYS + _VARIED_KEYS
    mine = config_lib.flat(config, without=without)
    found = []
    for name in config_lib.preset_names():
        theirs = config_lib.flat(config_lib.load(preset=name), without=without)
        found.append((name, [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]))
    return min(found, key=lambda p: len(p[1]))


def architecture(config: Config) -> str:
    m = config.model
    blocks = f", {m.blocks or 1} residual block{'s' if (m.blocks or 1) != 1 else ''} per resolution" if m.arch == "resnet" else ""
    blocks += ", GroupNorm" if m.norm == "group" else ""
    return f"{m.arch} (widths {'/'.join(map(str, m.resolved_widths))}{blocks}), {m.latent_dim} latent dimensions"


def _model(config: Config) -> str:
    name, differences = preset_of(config)
    if not differences:
        return f"the {name} preset: {architecture(config)}"
    flat = config_lib.flat(config)
    near = ""
    if len(differences) <= 4:  # say how it departs from a preset when that is short
        near = f" (the {name} preset with " + ", ".join(
            f"{k} = {config_lib.shown(flat, k)}" for k in differences) + ")"
    return f"custom{near}: {architecture(config)}"


def _by_value(entries: Sequence[Entry], value: Callable[[Entry], Any], shown: Callable[[Any], str]) -> str:
    """`shown(value)` of the runs, where they all agree; else each value with the runs that have it
    (counted where more than two have it)."""
    runs: dict[Any, list[str]] = {}
    for e in entries:
        runs.setdefault(value(e), []).append(e.label)
    if len(runs) == 1:
        return shown(next(iter(runs)))
    return "; ".join(f"{shown(v)} ({f'{len(labels)} runs' if len(labels) > 2 else ', '.join(labels)})"
                     for v, labels in sorted(runs.items(), key=lambda kv: -len(kv[1])))


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "not recorded"


def _samples(e: Entry) -> int | None:
    return (e.metrics.get("sample_quality") or {}).get("samples")


def scored_against(entries: Sequence[Entry]) -> str:
    """How many decoded samples the sample-quality figures scored against how many test images."""
    return _by_value(entries, lambda e: (_samples(e), e.metrics.get("test_images")),
                     lambda v: f"{_count(v[0])} decoded samples against the {_count(v[1])} test images"
                     if v[0] else "no sample-quality scores (the reference classifier knows 32x32 MNIST only)")


def _dates(entries: Sequence[Entry]) -> str:
    """The days the runs were evaluated (metrics.json's "evaluated"), as one day or a span."""
    days = sorted({e.metrics["evaluated"][:10] for e in entries if e.metrics.get("evaluated")})
    unknown = sum(not e.metrics.get("evaluated") for e in entries)
    if not days:
        return f"(the runs' {rundir.METRICS_FILE} record no date)"
    span = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    return span + (f" (not recorded for {unknown} run{'s' if unknown > 1 else ''})" if unknown else "")


def about(entries: Sequence[Entry], now: datetime | None = None) -> list[tuple[str, str]]:
    """The report's header: (what, which) for the dataset, the model, the training, the evaluation,
    the bdvae versions and the dates; from the first run's config and run.json where the runs
    agree (a report's runs differ only in regularizer, beta and seed: read_entries), from each
    run where they may not."""
    first = entries[0]
    config = _config(first.run_dir)
    facts = rundir.read_run_facts(first.run_dir)
    regs = ", ".join(dict.fromkeys(e.regularizer for e in entries))
    betas = ", ".join(dict.fromkeys(f"{e.beta:g}" for e in entries))
    seeds = ", ".join(map(str, sorted({e.seed for e in entries})))
    rows = [("runs", f"{len(entries)}: regularizer {regs}; β {betas}; seeds {seeds}")]
    if config is not None:
        # run.json records the shape; a run copied without it still has a known dataset's
        shape = facts.get("image_shape") or known_image_shape(config.data)
        shape_text = f", images {'×'.join(map(str, shape))} (channels×height×width)" if shape else ""
        train_images = f", {_count(facts['train_images'])} training images" if "train_images" in facts else ""
        test = _by_value(entries, lambda e: e.metrics.get("test_images"), _count)
        rows += [("dataset", f"{config.data.name}{shape_text}{train_images}; {test} test images evaluated"),
                 ("model", _model(config)),
                 ("training", f"{config.train.epochs} epoch{'s' if config.train.epochs != 1 else ''}, "
                              f"batch {config.train.batch_size}, "
                              f"likelihood {config.objective.likelihood}")]
    else:
        rows.append(("likelihood", _by_value(entries, lambda e: e.metrics.get("likelihood"), str)))
    k = _by_value(entries, lambda e: (e.metrics.get("iwae_nll") or {}).get("k"), _count)
    rows += [("IWAE −ln p(x)", f"importance samples per test image: K = {k}"),
             ("sample quality", scored_against(entries))]
    trained = _by_value(entries, lambda e: rundir.read_run_facts(e.run_dir).get("bdvae_version"),
                        lambda v: v or "an unrecorded version")
    evaluated = _by_value(entries, lambda e: e.metrics.get("bdvae_version"), lambda v: v or "an unrecorded version")
    now = now or datetime.now(timezone.utc)
    rows += [("bdvae", f"trained with {trained}; evaluated with {evaluated}; this report by {__version__}"),
             ("dates", f"evaluated {_dates(entries)}; this report written {now:%Y-%m-%d %H:%M} UTC")]
    return rows


# ---------------------------------------------------------------------------------------------
# The sections, in one list that both the Markdown and the HTML render


SAMPLERS_NOTE = ("Fitted samplers draw z from a density fitted to the aggregate posterior q(z) on the training "
                 "latents, then decode it; the test-latent ln p(z) is the mean log density (nats) of one "
                 "z ~ q(z|x) per test image under the sampler (the prior: N(0, I)), higher where q(z) is matched; "
                 "“Fréchet prior / this” is how many times lower the sampler's Fréchet distance is than the prior's.")


def _first_runs(entries: Sequence[Entry]) -> list[tuple[str, Entry]]:
    return [(f"{reg}, β={beta:g} (seed {members[0].seed})", members[0]) for (reg, beta), members in group(entries).items()]


def _sampler_pictures(entries: Sequence[Entry]) -> list[tuple[str, str]]:
    """(sampler, picture path in a run) for the samples of each sampler, when any was fitted."""
    names = sampler_names(entries)
    return [(f"samples from {name}", rundir.samples_picture(name)) for name in names] if len(names) > 1 else []


def _notes(entries: Sequence[Entry]) -> list[str]:
    notes = [entries[0].metrics.get("likelihood_note", "")]
    settings: dict[tuple[Any, ...], list[str]] = {}
    dtypes: dict[str, list[str]] = {}  # bf16 or fp32 decodes: the bound's estimate, not the model, differs
    for e in entries:
        if iwae := e.metrics.get("iwae_nll"):
            settings.setdefault(_setting(e.metrics), []).append(e.label)
            if "dtype" in iwae:
                dtypes.setdefault(iwae["dtype"], []).append(e.label)
    if len(settings) > 1:  # runs evaluated apart (bdvae report): the header says which figure is which bound
        notes.append("Evaluation settings differ between runs (see above): a smaller K gives a looser upper bound "
                     "on −ln p(x) (a higher figure); fewer samples, a larger Fréchet distance.")
        mixed = [f"{reg} β={beta:g}" for (reg, beta), members in group(entries).items()
                 if len({_setting(e.metrics) for e in members if e.metrics.get("iwae_nll")}) > 1]
        if mixed:
            notes.append(f"The mean ± std of {', '.join(mixed)} mixes seeds evaluated in different settings: "
                         "read its figures seed by seed.")
    if len(dtypes) > 1:
        notes.append("The IWAE's decoder ran in " + "; in ".join(f"{p} for {', '.join(runs)}" for p, runs in dtypes.items())
                     + " (bdvae evaluate --dtype; auto is bf16 on a CPU with AMX or a GPU with bf16).")
    nulls = sorted({f"{e.metrics['prior_match']['mmd2_null']:.5f}" for e in entries})
    notes.append("MMD² compares q(z) with N(0, I); the same statistic between two N(0, I) samples of that size "
                 f"(its null, pure sampling noise) is {', '.join(nulls)}.")
    return [minus_signs(n) for n in notes if n]


def _setting(metrics: dict[str, Any]) -> tuple[Any, ...]:
    """What the figures of one evaluation depend on besides the model: K, test images, samples."""
    return metrics["iwae_nll"]["k"], metrics.get("test_images"), (metrics.get("sample_quality") or {}).get("samples")


# A section's blocks: ("p", text), ("facts", [(what, which)]), ("table", Table), ("list", [text]),
# ("plot", file name in OUT), ("pictures", [(name, file in a run)]).
Block = tuple[str, Any]


def sections(entries: Sequence[Entry], rows: list[dict[str, Any]], now: datetime | None = None
             ) -> list[tuple[str, list[Block]]]:
    """The report: (section title, its blocks) in order; the first section is the header."""
    out: list[tuple[str, list[Block]]] = [
        ("What was compared", [("facts", about(entries, now)), ("p", summary_line(rows))])]
    for theme, title in THEMES.items():
        blocks: list[Block] = [("table", table(rows, theme_columns(theme)))]
        if theme == "sample quality":
            blocks.insert(0, ("p", f"Scores of {scored_against(entries)}, in the features of the reference "
                                   "MNIST classifier."))
        out.append((title, blocks))
    out.append(("Notes", [("list", _notes(entries))]))
    sampler_pics = _sampler_pictures(entries)
    if sampler_pics:
        out.append(("Samplers", [("p", f"Each sampler's scores of {scored_against(entries)}."),
                                 ("table", table(sampler_rows(entries), SAMPLER_COLUMNS)), ("p", SAMPLERS_NOTE)]))
    out.append(("Rate–distortion", [("plot", RATE_DISTORTION)]))
    out.append(("Pictures (first seed of each configuration)", [("pictures", list(PICTURES))]))
    if sampler_pics:
        out.append(("Samples per sampler (first seed of each configuration)", [("pictures", sampler_pics)]))
    return out


TITLE_NAMES = 3  # configurations a title names; more are counted, and the "runs" row names them


def title(entries: Sequence[Entry]) -> str:
    config = _config(entries[0].run_dir)
    regs = list(dict.fromkeys(e.regularizer for e in entries))
    what = f": {' vs '.join(regs)}" if len(regs) <= TITLE_NAMES else f" of {len(regs)} configurations"
    return f"bdvae comparison{what}" + (f" on {config.data.name}" if config is not None else "")


Sections = list[tuple[str, list[Block]]]


def markdown(entries: Sequence[Entry], rows: list[dict[str, Any]], out: Path, now: datetime | None = None,
             parts_of: Sections | None = None) -> str:
    """The report in Markdown; `parts_of`: its sections, if already made (write_report makes them once)."""
    parts = [f"# {title(entries)}", ""]
    for name, blocks in parts_of or sections(entries, rows, now):
        parts += [f"## {name}", ""]
        for kind, value in blocks:
            if kind == "p":
                parts.append(minus_signs(value))
            elif kind == "facts":
                parts += [f"- **{what}**: {minus_signs(which)}" for what, which in value]
            elif kind == "table":
                parts.append(markdown_table(value))
            elif kind == "list":
                parts += [f"- {n}" for n in value]
            elif kind == "plot":
                parts.append(f"![rate-distortion]({value})")
            elif kind == "pictures":
                header = ["configuration", *(name for name, _ in value)]
                parts += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                for conf, e in _first_runs(entries):
                    rel = Path(os.path.relpath(e.run_dir, out))  # runs may lie outside OUT (bdvae report)
                    parts.append("| " + " | ".join([conf, *(f"![{n}]({(rel / f).as_posix()})" for n, f in value)]) + " |")
            parts.append("")
    return "\n".join(parts)


def _img(path: Path, css_class: str = "") -> str:
    if not path.is_file():
        return "<em>missing</em>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    klass = f' class="{css_class}"' if css_class else ""
    return f'<img{klass} src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _keep_arrow(name: str) -> str:
    """A column name whose direction arrow stays on its line when the header wraps (a no-break space)."""
    return re.sub(" (?=[↓↑]$)", "\u00a0", name)


def _html_table(t: Table) -> str:
    """A table in a box of its own that scrolls sideways should it be wider than the page; the
    headers wrap, a unit on a line of its own."""
    head = "".join(f"<th>{html.escape(_keep_arrow(name))}"
                   + (f'<br><span class="unit">{html.escape(unit)}</span>' if unit else "")
                   + "</th>" for name, unit in t.header)
    body = "".join("<tr>" + "".join(f'<td class="best"><b>{html.escape(v)}</b></td>' if b else f"<td>{html.escape(v)}</td>"
                                    for v, b in zip(row, best)) + "</tr>" for row, best in zip(t.rows, t.best))
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _figures(entries: Sequence[Entry], pics: Sequence[tuple[str, str]]) -> str:
    """Per configuration (its first seed), its pictures side by side, wrapping onto the next line."""
    parts = []
    for conf, e in _first_runs(entries):
        figures = "".join(f"<figure>{_img(e.run_dir / f, 'wide' if f.endswith('histograms.png') else 'grid')}"
                          f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, f in pics)
        parts.append(f"<h3>{html.escape(conf)}</h3><div class=\"figures\">{figures}</div>")
    return "".join(parts)


def html_page(entries: Sequence[Entry], rows: list[dict[str, Any]], out: Path, now: datetime | None = None,
              parts_of: Sections | None = None) -> str:
    """The report as one self-contained HTML page; `parts_of` as for markdown."""
    body = []
    for name, blocks in parts_of or sections(entries, rows, now):
        body.append(f"<h2>{html.escape(name)}</h2>")
        for kind, value in blocks:
            if kind == "p":
                body.append(f"<p>{html.escape(minus_signs(value))}</p>")
            elif kind == "facts":
                body.append('<table class="facts">' + "".join(
                    f"<tr><th>{html.escape(what)}</th><td>{html.escape(minus_signs(which))}</td></tr>"
                    for what, which in value) + "</table>")
            elif kind == "table":
                body.append(_html_table(value))
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in value) + "</ul>")
            elif kind == "plot":
                body.append(_img(out / value, "plot"))
            elif kind == "pictures":
                body.append(_figures(entries, value))
    content = "\n".join(body)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title(entries))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1240px; color: #222; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: top; }}
td {{ white-space: nowrap; }}
th {{ background: #f3f3f3; vertical-align: bottom; }}
th .unit {{ font-weight: normal; color: #555; }}
td.best {{ background: #e3f1dc; }}
table.facts th, table.facts td {{ text-align: left; vertical-align: top; white-space: normal; }}
table.facts th {{ background: none; white-space: nowrap; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }}
figcaption {{ text-align: center; font-size: 0.9em; color: #555; }}
img {{ max-width: 100%; height: auto; }}
img.grid {{ width: 272px; image-rendering: pixelated; }}
img.plot {{ width: 560px; }}
figure:has(img.wide) {{ flex-basis: 100%; }}
img.wide {{ width: 1200px; }}
</style></head><body>
<h1>{html.escape(title(entries))}</h1>
{content}
</body></html>
"""


def write_report(out: Path, entries: Sequence[Entry]) -> tuple[Path, Path]:
    """Write OUT/rate_distortion.png, OUT/report.md and OUT/report.html; return the two reports."""
    rows = summary_rows(entries)
    parts_of = sections(entries, rows, datetime.now(timezone.utc))  # once: it reads every run's run.json
    save_rate_distortion(rows, out / RATE_DISTORTION)
    write_text(out / REPORT_MD, markdown(entries, rows, out, parts_of=parts_of))
    write_text(out / REPORT_HTML, html_page(entries, rows, out, parts_of=parts_of))
    return out / REPORT_MD, out / REPORT_HTML


# What the runs of one report vary; besides these they may differ only in config.MACHINE_KEYS. Any
# other difference is another model.
_VARIED_KEYS = ("objective.regularizer", "objective.beta", "objective.aggregate", "objective.aggregate_weight", "train.seed")


def report_files_in(out: Path) -> list[str]:
    """The files of a report (REPORT_FILES) that the folder `out` holds."""
    return [file for file in REPORT_FILES if (out / file).exists()]


def report(run_dirs: Sequence[Path], out: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """The report of run directories trained and evaluated apart (`bdvae report`): every run
    checked before anything is written, an earlier report in `out` replaced only with `overwrite`;
    returns report.md and report.html."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BdvaeError(f"--out {out}: exists and is not a folder", python=f"out={out}: exists and is not a folder")
    there = report_files_in(out)
    if there and not overwrite:
        raise BdvaeError(f"--out {out}: holds a report ({there[0]}); pass --overwrite to replace it",
                         python=f"out={out}: holds a report ({there[0]}); pass overwrite=True to replace it")
    entries = read_entries(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    return write_report(out, entries)


def read_entries(run_dirs: Sequence[Path]) -> list[Entry]:
    """The entries of run directories trained and evaluated apart (`bdvae report`), in the order
    given; their weights are not needed, their metrics.json is. They must be of one model and data:
    every config value but the regularizer, beta and seed the same."""
    entries: list[Entry] = []
    first: tuple[Path, dict[str, Any]] | None = None
    for run_dir in map(Path, run_dirs):
        if not (run_dir / rundir.CONFIG_FILE).is_file():
            raise BdvaeError(f"{run_dir}: not a run directory (no {rundir.CONFIG_FILE})")
        config = rundir.read_config(run_dir)
        try:
            metrics = rundir.read_metrics(run_dir)
        except ValueError as e:
            raise BdvaeError(f"{run_dir / rundir.METRICS_FILE}: not readable JSON ({e})") from None
        if not isinstance(metrics, dict):
            raise BdvaeError(f"{run_dir}: not evaluated; run `bdvae evaluate {run_dir}` first",
                             python=f"{run_dir}: not evaluated; call bdvae.evaluate({str(run_dir)!r}) first")
        # An evaluation from before the samplers scored N(0, I) alone, at the top level: its report
        # has every figure but the samplers' (compare evaluates such a run again; a report cannot).
        metrics.setdefault("samplers", {})
        if missing := missing_figures(metrics):
            lacks = f"{run_dir}: its {rundir.METRICS_FILE} lacks {missing[0]}"
            raise BdvaeError(f"{lacks}; run `bdvae evaluate {run_dir}` again",
                             python=f"{lacks}; call bdvae.evaluate({str(run_dir)!r}) again")
        flat = config_lib.flat(config, without=config_lib.MACHINE_KEYS + _VARIED_KEYS)
        if first is None:
            first = run_dir, flat
        elif key := config_lib.first_difference(flat, first[1]):
            raise BdvaeError(f"{run_dir}: {key} is {config_lib.shown(flat, key)}, {first[0]} has {config_lib.shown(first[1], key)}; "
                             "a report compares objectives (regularizer, beta, aggregate term) and seeds of one model on one dataset")
        entry = Entry(objective_name(config.objective), config.objective.beta, config.train.seed, run_dir, metrics)
        if twin := next((e for e in entries if (e.regularizer, e.beta, e.seed) == (entry.regularizer, entry.beta, entry.seed)), None):
            raise BdvaeError(f"{run_dir} and {twin.run_dir}: both are {entry.regularizer}, β={entry.beta:g}, seed {entry.seed}")
        entries.append(entry)
    if not entries:
        raise BdvaeError("name at least one run directory")
    return entries
