"""The comparison report: OUT/report.md (pictures linked) and OUT/report.html (pictures embedded).

Both hold the metrics table (mean ± std over seeds), the three pictures and the latent histograms
of each configuration side by side (its first seed), and the rate-distortion plot
OUT/rate_distortion.png. Where the runs were evaluated with fitted latent samplers, a second table
gives each sampler's sample quality and prior-hole figures, and a picture row per configuration
shows their samples side by side.

`bdvae compare` writes it for the runs it trains; `bdvae report` for runs trained and evaluated
apart (read_entries), which may lie anywhere: the Markdown links them relative to OUT.
"""

from __future__ import annotations

import base64
import html
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdvae import config as config_lib
from bdvae import pictures, rundir
from bdvae.errors import BdvaeError
from bdvae.files import write_text
from bdvae.metrics import FIGURES, missing_figures


@dataclass(frozen=True)
class Entry:
    """One configuration and seed of a comparison: where its run lives and its evaluation."""

    regularizer: str
    beta: float
    seed: int
    run_dir: Path
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.regularizer} β={self.beta:g} seed {self.seed}"


# (column, path into metrics.json, decimals), from the one table of reported figures: the run's
# (sample quality: the prior's), and each sampler's, read from metrics["samplers"][NAME].
COLUMNS: tuple[tuple[str, tuple[str, ...], int], ...] = tuple(
    (f.column, f.path, f.decimals) for f in FIGURES if f.column and f.decimals is not None and f.scope != "sampler")
SAMPLER_COLUMNS: tuple[tuple[str, tuple[str, ...], int], ...] = tuple(
    (f.column, f.path, f.decimals) for f in FIGURES if f.column and f.decimals is not None and f.scope != "run")
REPORT_MD, REPORT_HTML, RATE_DISTORTION = "report.md", "report.html", "rate_distortion.png"
REPORT_FILES = (REPORT_MD, REPORT_HTML, RATE_DISTORTION)  # what write_report puts in OUT
PICTURES = (("originals", rundir.ORIGINALS), ("reconstructions", rundir.RECONSTRUCTIONS),
            ("samples from N(0, I)", rundir.SAMPLES), ("latent histograms", rundir.LATENT_HISTOGRAMS))


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def group(entries: Sequence[Entry]) -> dict[tuple[str, float], list[Entry]]:
    """Entries by (regularizer, beta), in the order first seen."""
    groups: dict[tuple[str, float], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.regularizer, e.beta), []).append(e)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cells(metrics: Sequence[dict[str, Any]], columns: Sequence[tuple[str, tuple[str, ...], int]]
           ) -> dict[str, tuple[float, float] | None]:
    """(mean, std) over the seeds' metrics per column; None where no seed has the value."""
    cells: dict[str, tuple[float, float] | None] = {}
    for label, path, _ in columns:
        values = [v for m in metrics if (v := _get(m, path)) is not None]
        cells[label] = mean_std(values) if values else None
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


def _cell(value: tuple[float, float] | None, decimals: int, seeds: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if seeds > 1 else f"{mean:.{decimals}f}"


HEADER = ("regularizer", "β", "seeds", *(label for label, _, _ in COLUMNS))
SAMPLER_HEADER = ("regularizer", "β", "sampler", "seeds", *(label for label, _, _ in SAMPLER_COLUMNS))


def row_values(r: dict[str, Any]) -> list[str]:
    """One summary row as the texts of its table cells, in HEADER order (SAMPLER_HEADER for a sampler row)."""
    columns = SAMPLER_COLUMNS if "sampler" in r else COLUMNS
    return [r["regularizer"], f"{r['beta']:g}", *([r["sampler"]] if "sampler" in r else []), str(r["seeds"]),
            *(_cell(r["cells"][label], d, r["seeds"]) for label, _, d in columns)]


def summary_line(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seeds"] for r in rows})
    spread = "mean ± std over seeds" if seeds[-1] > 1 else "one seed, so no spread over seeds"
    return (f"{len(rows)} configuration{'s' if len(rows) != 1 else ''}, "
            f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} each; "
            f"{spread}; ↓ lower is better, ↑ higher is better.")


def markdown_table(rows: list[dict[str, Any]], header: Sequence[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row_values(r)) + " |" for r in rows]
    return "\n".join(lines)


def save_rate_distortion(rows: list[dict[str, Any]], path: Path) -> None:
    """Rate (KL of the posteriors to the prior) against distortion (reconstruction NLL): one point
    per configuration with ±1 std bars over seeds; the betas of one regularizer joined as a curve."""
    plt = pictures.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    for reg in dict.fromkeys(r["regularizer"] for r in rows):
        points = sorted((r for r in rows if r["regularizer"] == reg and r["cells"]["KL"] and r["cells"]["recon NLL ↓"]),
                        key=lambda r: r["beta"])
        xs = [r["cells"]["KL"] for r in points]
        ys = [r["cells"]["recon NLL ↓"] for r in points]
        ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                    marker="o", capsize=3, label=reg, linestyle="-" if len(points) > 1 else "none")
        for r, x, y in zip(points, xs, ys):
            ax.annotate(f"β={r['beta']:g}", (x[0], y[0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("rate: KL(q(z|x) || N(0, I)) per image (nats)")
    ax.set_ylabel("distortion: reconstruction NLL per image (nats)")
    ax.set_title("rate–distortion on the test set")
    ax.grid(alpha=0.3)
    ax.legend()
    pictures.save_figure(fig, path)


def _first_runs(entries: Sequence[Entry]) -> list[tuple[str, Entry]]:
    return [(f"{reg}, β={beta:g} (seed {members[0].seed})", members[0]) for (reg, beta), members in group(entries).items()]


def _sampler_pictures(entries: Sequence[Entry]) -> list[tuple[str, str]]:
    """(sampler, picture path in a run) for the samples of each sampler, when any was fitted."""
    names = sampler_names(entries)
    return [(f"samples from {name}", rundir.samples_picture(name)) for name in names] if len(names) > 1 else []


SAMPLERS_NOTE = ("Fitted samplers draw z from a density fitted to the aggregate posterior q(z) on the training "
                 "latents, then decode it; the test-latent ln p(z) is the mean log density (nats) of one "
                 "z ~ q(z|x) per test image under the sampler (the prior: N(0, I)), higher where q(z) is matched; "
                 "“Fréchet prior / this” is how many times lower the sampler's Fréchet distance is than the prior's.")


def _setting(metrics: dict[str, Any]) -> str:
    """What the figures of one evaluation depend on besides the model: K, test images, samples."""
    samples = (metrics.get("sample_quality") or {}).get("samples")
    return (f"IWAE K = {metrics['iwae_nll']['k']} importance samples per image, {metrics.get('test_images')} test images"
            + (f", {samples} decoded samples scored" if samples else ""))


def _notes(entries: Sequence[Entry]) -> list[str]:
    first = entries[0].metrics
    notes = [first.get("likelihood_note", "")]
    settings: dict[str, list[str]] = {}
    precisions: dict[str, list[str]] = {}  # bf16 or fp32 decodes: the bound's estimate, not the model, differs
    for e in entries:
        if iwae := e.metrics.get("iwae_nll"):
            settings.setdefault(_setting(e.metrics), []).append(e.label)
            if "precision" in iwae:
                precisions.setdefault(iwae["precision"], []).append(e.label)
    if len(settings) == 1:
        notes.append(f"Each run evaluated with {next(iter(settings))}.")
    elif settings:  # runs evaluated apart (bdvae report): say which figure is which bound
        notes.append("Evaluation settings differ between runs: " + "; ".join(
            f"{setting} for {', '.join(runs)}" for setting, runs in settings.items())
            + ". A smaller K gives a looser upper bound on −ln p(x) (a higher figure); fewer samples, a larger Fréchet distance.")
        mixed = [f"{reg} β={beta:g}" for (reg, beta), members in group(entries).items()
                 if len({_setting(e.metrics) for e in members if e.metrics.get("iwae_nll")}) > 1]
        if mixed:
            notes.append(f"The mean ± std of {', '.join(mixed)} mixes seeds evaluated in different settings: "
                         "read its figures seed by seed.")
    if len(precisions) > 1:
        notes.append("The IWAE's decoder ran in " + "; in ".join(f"{p} for {', '.join(runs)}" for p, runs in precisions.items())
                     + " (bdvae evaluate --precision; auto is bf16 where the hardware has it natively).")
    nulls = sorted({f"{e.metrics['prior_match']['mmd2_null']:.5f}" for e in entries})
    notes.append("MMD² compares q(z) with N(0, I); the same statistic between two N(0, I) samples of that size "
                 f"(its null, pure sampling noise) is {', '.join(nulls)}.")
    return [n for n in notes if n]


def markdown(entries: Sequence[Entry], rows: list[dict[str, Any]], out: Path) -> str:
    parts = ["# bdvae comparison", "", summary_line(rows), "",
             markdown_table(rows), "", *(f"- {n}" for n in _notes(entries)), ""]
    sampler_pics = _sampler_pictures(entries)
    if sampler_pics:
        parts += ["## Samplers", "", markdown_table(sampler_rows(entries), SAMPLER_HEADER), "", SAMPLERS_NOTE, ""]
    parts += ["## Rate–distortion", "", f"![rate-distortion]({RATE_DISTORTION})", ""]
    for title, pics in (("Pictures", PICTURES), ("Samples per sampler", tuple(sampler_pics))):
        if not pics:
            continue
        header = ["configuration", *(name for name, _ in pics)]
        parts += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for conf, e in _first_runs(entries):
            rel = Path(os.path.relpath(e.run_dir, out))  # runs may lie outside OUT (bdvae report)
            parts.append("| " + " | ".join([conf, *(f"![{name}]({(rel / f).as_posix()})" for name, f in pics)]) + " |")
        parts.append("")
    return "\n".join(parts)


def _img(path: Path, css_class: str = "") -> str:
    if not path.is_file():
        return "<em>missing</em>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    klass = f' class="{css_class}"' if css_class else ""
    return f'<img{klass} src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _html_table(header: Sequence[str], rows: list[dict[str, Any]]) -> str:
    """A table in a box of its own that scrolls sideways when it is wider than the page."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row_values(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _figures(entries: Sequence[Entry], pics: Sequence[tuple[str, str]]) -> str:
    """Per configuration (its first seed), its pictures side by side, wrapping onto the next line."""
    parts = []
    for conf, e in _first_runs(entries):
        figures = "".join(f"<figure>{_img(e.run_dir / f, 'wide' if f.endswith('histograms.png') else 'grid')}"
                          f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, f in pics)
        parts.append(f"<h3>{html.escape(conf)}</h3><div class=\"figures\">{figures}</div>")
    return "".join(parts)


def html_page(entries: Sequence[Entry], rows: list[dict[str, Any]], out: Path) -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(entries))
    sampler_pics = _sampler_pictures(entries)
    samplers = ""
    if sampler_pics:
        samplers = (f"<h2>Samplers</h2>{_html_table(SAMPLER_HEADER, sampler_rows(entries))}"
                    f"<p>{html.escape(SAMPLERS_NOTE)}</p>"
                    f"<h2>Samples per sampler (first seed of each configuration)</h2>{_figures(entries, sampler_pics)}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>bdvae comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1400px; color: #222; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: top; white-space: nowrap; }}
th {{ background: #f3f3f3; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }}
figcaption {{ text-align: center; font-size: 0.9em; color: #555; }}
img {{ max-width: 100%; height: auto; }}
img.grid {{ width: 272px; image-rendering: pixelated; }}
img.plot {{ width: 560px; }}
figure:has(img.wide) {{ flex-basis: 100%; }}
img.wide {{ width: 1200px; }}
</style></head><body>
<h1>bdvae comparison</h1>
<p>{html.escape(summary_line(rows))}</p>
{_html_table(HEADER, rows)}
<ul>{notes}</ul>
{samplers}
<h2>Rate–distortion</h2>{_img(out / RATE_DISTORTION, "plot")}
<h2>Pictures (first seed of each configuration)</h2>
{_figures(entries, PICTURES)}
</body></html>
"""


def write_report(out: Path, entries: Sequence[Entry]) -> tuple[Path, Path]:
    """Write OUT/rate_distortion.png, OUT/report.md and OUT/report.html; return the two reports."""
    rows = summary_rows(entries)
    save_rate_distortion(rows, out / RATE_DISTORTION)
    write_text(out / REPORT_MD, markdown(entries, rows, out))
    write_text(out / REPORT_HTML, html_page(entries, rows, out))
    return out / REPORT_MD, out / REPORT_HTML


# What the runs of one report vary; besides these they may differ only in config.MACHINE_KEYS. Any
# other difference is another model.
_VARIED_KEYS = ("objective.regularizer", "objective.beta", "train.seed")


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
            raise BdvaeError(f"{run_dir}: not evaluated; run `bdvae evaluate {run_dir}` first")
        if missing := missing_figures(metrics):
            raise BdvaeError(f"{run_dir}: its {rundir.METRICS_FILE} lacks {missing[0]}; run `bdvae evaluate {run_dir}` again")
        flat = config_lib.flat(config, without=config_lib.MACHINE_KEYS + _VARIED_KEYS)
        if first is None:
            first = run_dir, flat
        elif key := config_lib.first_difference(flat, first[1]):
            raise BdvaeError(f"{run_dir}: {key} is {config_lib.shown(flat, key)}, {first[0]} has {config_lib.shown(first[1], key)}; "
                             "a report compares regularizers, betas and seeds of one model on one dataset")
        entry = Entry(config.objective.regularizer, config.objective.beta, config.train.seed, run_dir, metrics)
        if twin := next((e for e in entries if (e.regularizer, e.beta, e.seed) == (entry.regularizer, entry.beta, entry.seed)), None):
            raise BdvaeError(f"{run_dir} and {twin.run_dir}: both are {entry.regularizer}, β={entry.beta:g}, seed {entry.seed}")
        entries.append(entry)
    if not entries:
        raise BdvaeError("name at least one run directory")
    return entries
