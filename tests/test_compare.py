"""`bdvae compare` end to end on a tiny configuration; reuse of finished runs; the report's numbers."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bdvae import config as config_lib
from bdvae import pictures
from bdvae._version import __version__
from bdvae.comparison import Entry, gpu_slots
from bdvae.reporting import (COLUMNS, SAMPLER_COLUMNS, THEMES, architecture, heading, html_page, markdown,
                          markdown_table, minus_signs, number, rate_distortion_figure, summary_line, summary_rows, table,
                          theme_columns, title)
from conftest import run_cli


def _compare(mnist_dir, out, *extra):
    return run_cli("compare", "--regularizers", "bhattacharyya,kl", "--seeds", "2", "--epochs", "1",
                   "--out", str(out), "--data-dir", str(mnist_dir), "--set", "data.train_size=512",
                   "--set", "train.batch_size=64", "-k", "2", "--samples", "300", "--test-size", "300", "--quiet", *extra)


@pytest.fixture(scope="module")
def compared(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    result = _compare(mnist_dir, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_every_configuration_and_seed_is_trained_evaluated_and_reported(compared):
    runs = sorted(p.name for p in (compared / "runs").iterdir() if not p.name.startswith("."))
    assert runs == ["bhattacharyya-beta1-seed0", "bhattacharyya-beta1-seed1", "kl-beta1-seed0", "kl-beta1-seed1"]
    for name in runs:
        m = json.loads((compared / "runs" / name / "metrics.json").read_text())
        assert m["regularizer"] == name.split("-")[0] and m["test_images"] == 300
    md = (compared / "report.md").read_text()
    assert md.count("| bhattacharyya | 1 | 2 |") == 3 and md.count("| kl | 1 | 2 |") == 3  # a row in each theme's table
    facts = dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", md, re.MULTILINE))
    assert facts["dataset"] == "mnist, images 1×32×32 (channels×height×width), 512 training images; 300 test images evaluated"
    assert facts["bdvae"] == f"trained with {__version__}; evaluated with {__version__}; this report by {__version__}"
    assert re.fullmatch(r"evaluated \d{4}-\d\d-\d\d( to \d{4}-\d\d-\d\d)?; this report written .+ UTC", facts["dates"])
    assert " ± " in md and "![rate-distortion](rate_distortion.png)" in md
    assert "runs/kl-beta1-seed0/samples.png" in md
    page = (compared / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 + 2 * 4  # the plot, 4 pictures per configuration
    assert "src=\"http" not in page and "missing" not in page
    assert (compared / "rate_distortion.png").stat().st_size > 1000


@pytest.mark.slow
def test_jobs_train_configurations_in_parallel_processes_with_the_same_results(compared, mnist_dir, tmp_path):
    out = tmp_path / "parallel"
    result = _compare(mnist_dir, out, "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert "4 runs, 2 at a time" in result.stdout
    lines = result.stdout.splitlines()
    # Each job prints its run's lines in order ("NAME: training" ... "NAME: evaluating"); the
    # parent's "done" lines lag behind them, so overlap is read from the jobs' own lines.
    names = ("bhattacharyya-beta1-seed0", "bhattacharyya-beta1-seed1", "kl-beta1-seed0", "kl-beta1-seed1")
    assert all(f"[{name}] {name}: {step}" in lines for name in names for step in ("training", "evaluating")), result.stdout
    trained = {name: (lines.index(f"[{name}] {name}: training"), lines.index(f"[{name}] {name}: evaluating"))
               for name in names}
    overlapping = [(a, b) for a, (start_a, end_a) in trained.items() for b, (start_b, _) in trained.items()
                   if a != b and start_a < start_b < end_a]
    assert overlapping, result.stdout  # a run started training while another was still training
    for name in ("bhattacharyya-beta1-seed0", "kl-beta1-seed1"):
        ours = json.loads((out / "runs" / name / "metrics.json").read_text())
        theirs = json.loads((compared / "runs" / name / "metrics.json").read_text())
        # Another thread count may round sums differently; the runs are the same runs.
        assert ours["iwae_nll"]["mean"] == pytest.approx(theirs["iwae_nll"]["mean"], rel=1e-3)
        assert ours["divergences"]["kl"]["mean"] == pytest.approx(theirs["divergences"]["kl"]["mean"], rel=1e-3)
    assert (out / "report.md").read_text().count(" ± ") == (compared / "report.md").read_text().count(" ± ")


def _long_compare_with_jobs(mnist_dir, out):
    """`compare --jobs 2` of 4 runs, each training long enough (3 epochs of 8,192 images on one
    thread) that nothing ends by itself while a test stops it."""
    return [sys.executable, "-m", "bdvae", "compare", "--regularizers", "bhattacharyya,kl", "--seeds", "2",
            "--epochs", "3", "--jobs", "2", "--out", str(out), "--data-dir", str(mnist_dir),
            "--set", "data.train_size=8192", "--set", "train.batch_size=64", "-k", "2", "--samples", "300",
            "--test-size", "300", "--quiet"]


@pytest.mark.slow
def test_a_failed_job_stops_the_running_ones_and_starts_no_other(mnist_dir, tmp_path):
    out = tmp_path / "cmp"
    taken = out / "runs" / "bhattacharyya-beta1-seed0"
    taken.mkdir(parents=True)
    from bdvae import config as config_lib, rundir

    rundir.write_config(taken, config_lib.load(overrides=["data.train_size=8192", "train.batch_size=64", "train.epochs=3",
                                                          "train.lr=0.5"]))  # another config: its job fails at once
    before = (taken / "config.toml").read_text()
    result = subprocess.run(_long_compare_with_jobs(mnist_dir, out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr == f"bdvae: error: {taken}: holds a run with a different config (train.lr is 0.5 there); " \
                            "choose another --out or move that run away\n"
    assert (taken / "config.toml").read_text() == before
    assert not (out / "runs" / "bhattacharyya-beta1-seed1" / "run.json").exists()  # stopped midway
    assert not (out / "runs" / "kl-beta1-seed0").exists() and not (out / "runs" / "kl-beta1-seed1").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_job_in_one_line_and_starts_no_other(mnist_dir, tmp_path):
    out = tmp_path / "cmp"
    # Its own session, so that the SIGINT goes to the whole process group, as a terminal's Ctrl-C does.
    proc = subprocess.Popen(_long_compare_with_jobs(mnist_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    started = set()
    while len(started) < 2:  # both jobs are training
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if line.endswith(": training\n"):
            started.add(line.split()[0])
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr == "bdvae: interrupted\n", stderr
    assert started == {"[bhattacharyya-beta1-seed0]", "[bhattacharyya-beta1-seed1]"}
    assert not any((out / "runs" / name / "run.json").exists() for name in ("bhattacharyya-beta1-seed0", "bhattacharyya-beta1-seed1"))
    assert not (out / "runs" / "kl-beta1-seed0").exists() and not (out / "runs" / "kl-beta1-seed1").exists()


@pytest.mark.slow
def test_finished_runs_are_reused_and_unfinished_ones_resumed(compared, mnist_dir):
    weights = compared / "runs" / "kl-beta1-seed0" / "model.safetensors"
    before = weights.read_bytes(), weights.stat().st_mtime_ns
    (compared / "runs" / "kl-beta1-seed1" / "run.json").unlink()  # as a killed training leaves it
    result = _compare(mnist_dir, compared)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished run reused") == 3
    assert "kl-beta1-seed1: resuming an unfinished run" in result.stdout
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    assert (compared / "runs" / "kl-beta1-seed1" / "run.json").is_file()


def test_a_run_with_another_config_is_refused_and_left_alone(compared, mnist_dir):
    config = compared / "runs" / "bhattacharyya-beta1-seed0" / "config.toml"
    before = config.read_bytes()
    result = _compare(mnist_dir, compared, "--set", "train.lr=0.01")
    assert result.returncode == 2
    assert "holds a run with a different config" in result.stderr and "Traceback" not in result.stderr
    assert config.read_bytes() == before


def test_a_run_differing_only_in_how_a_machine_runs_it_is_reused(tmp_path):
    from dataclasses import replace

    from bdvae import rundir
    from bdvae.comparison import ensure_trained
    from bdvae.config import Config
    from bdvae.errors import BdvaeError

    config = Config()
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_config(run, replace(config, data=replace(config.data, data_dir=str(tmp_path / "another-cache")),
                                     train=replace(config.train, threads=1, checkpoint_every=7, log_every=3,
                                                   tensorboard=True, step="device")))
    for name in ("run.json", "model.safetensors"):  # what marks it finished
        (run / name).write_text("{}")
    said = []
    ensure_trained(config, run, progress=False, log=said.append)
    assert said == ["run: finished run reused"]
    with pytest.raises(BdvaeError, match=r"holds a run with a different config \(train.lr is 0.001 there\)"):
        ensure_trained(replace(config, train=replace(config.train, lr=0.01)), run, progress=False, log=said.append)


@pytest.mark.parametrize("args,message", [
    (["--beta", "one"], "--beta: expected a comma-separated list"),
    (["--regularizers", "bhattacharyya,nope"], "objective.regularizer must be one of"),
    (["--seeds", "0"], "--seeds and --epochs must be positive"),
    (["--beta", "0.1234561,0.1234564"], "would share a run directory"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from 'auto', 'cpu', 'cuda')"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here")]),
])
def test_bad_arguments_are_one_line_before_any_training(args, message, tmp_path):
    result = run_cli("compare", "--out", str(tmp_path / "c"), *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_compare_jobs_take_the_gpus_in_turn():
    assert gpu_slots(5, 2) == [0, 1, 0, 1, 0]  # more jobs than GPUs: they share, evenly
    assert gpu_slots(3, 8) == [0, 1, 2]  # fewer: each on a GPU of its own
    assert gpu_slots(1, 1) == [0]


def test_summary_is_mean_and_sample_std_over_seeds():
    def entry(reg, seed, nll):
        return Entry(reg, 1.0, seed, Path("."), {"reconstruction": {"nll": {"mean": nll}}})

    rows = summary_rows([entry("bhattacharyya", 0, 10.0), entry("bhattacharyya", 1, 14.0), entry("kl", 0, 7.0)])
    assert [(r["regularizer"], r["seeds"]) for r in rows] == [("bhattacharyya", 2), ("kl", 1)]
    mean, std = rows[0]["cells"]["recon NLL"]
    assert mean == 12.0 and std == pytest.approx(2 ** 1.5)  # sample std of 10 and 14
    assert rows[0]["cells"]["KL"] is None
    text = markdown_table(table(rows, theme_columns("likelihood")))
    assert "| bhattacharyya | 1 | 2 | 12.00 ± 2.83 |" in text and "| kl | 1 | 1 | **7.00** |" in text  # lower is better
    assert text.startswith("| regularizer | β | seeds | recon NLL ↓ (nats) |\n")  # no run has the others
    assert summary_line(rows).startswith("2 configurations, 1/2 seeds each; mean ± std over seeds;")
    assert summary_line(rows[1:]).startswith("1 configuration, 1 seed each; one seed, so no spread over seeds;")


def _entry(reg, beta, seed, **figures):
    """An entry whose metrics hold the given figures, by column name (report.COLUMNS)."""
    metrics = {"iwae_nll": {"mean": 85.0, "k": 5000}, "test_images": 10000, "prior_match": {"mmd2_null": 3e-5}}
    for f in COLUMNS:
        if f.column in figures:
            where = metrics
            for key in f.path[:-1]:
                where = where.setdefault(key, {})
            where[f.path[-1]] = figures[f.column]
    return Entry(reg, beta, seed, Path("."), metrics)


def test_a_column_no_run_has_is_left_out_and_one_some_runs_lack_shows_a_dash():
    """Runs evaluated before a figure existed (aggregate BD, say) give no empty column."""
    entries = [_entry("bhattacharyya", 1.0, 0, **{"‖mean q(z)‖": 0.3, "active units": 16}),
               _entry("kl", 1.0, 0, **{"‖mean q(z)‖": 0.2, "active units": 16})]
    header = [name for name, _ in table(summary_rows(entries), theme_columns("prior match")).header]
    assert header == ["regularizer", "β", "seeds", "‖mean q(z)‖ ↓", "active units"]
    entries.append(_entry("kl", 2.0, 0, **{"‖mean q(z)‖": 0.1, "aggregate BD": 0.05}))
    prior = table(summary_rows(entries), theme_columns("prior match"))
    header = [name for name, _ in prior.header]
    assert "aggregate BD ↓" in header
    assert [r[header.index("aggregate BD ↓")] for r in prior.rows] == ["–", "–", "0.050"]


def test_the_best_of_each_column_with_a_direction_is_bold_and_ties_share_it():
    entries = [_entry("bhattacharyya", 1.0, 0, **{"recon NLL": 50.0, "classifier score": 6.0, "KL": 40.0, "precision": 0.6}),
               _entry("kl", 1.0, 0, **{"recon NLL": 60.0, "classifier score": 7.5, "KL": 20.0, "precision": 0.6004}),
               _entry("kl", 2.0, 0, **{"recon NLL": 70.0, "classifier score": 7.0, "KL": 10.0})]
    rows = summary_rows(entries)
    likelihood = markdown_table(table(rows, theme_columns("likelihood")))
    assert "| bhattacharyya | 1 | 1 | **50.00** | 40.00 |" in likelihood  # ↓: the lowest NLL
    assert "| kl | 2 | 1 | 70.00 | 10.00 |" in likelihood  # KL has no direction: never bold
    quality = table(rows, theme_columns("sample quality"))
    column = [name for name, _ in quality.header]
    score, precision = column.index("classifier score ↑"), column.index("precision ↑")
    assert [r[score] for r in quality.best] == [False, True, False]  # ↑: the highest score
    assert [r[precision] for r in quality.best] == [True, True, False]  # 0.600 and 0.600 as shown: a tie
    assert [r[precision] for r in table(rows, theme_columns("sample quality")).rows] == ["0.600", "0.600", "–"]
    page = html_page(entries, rows, Path("."))
    assert '<td class="best"><b>50.00</b></td>' in page and '<td class="best"><b>7.50</b></td>' in page
    alone = summary_rows(entries[:1])  # one configuration: nothing to compare, nothing marked
    assert not any(any(r) for r in table(alone, theme_columns("likelihood")).best)


def test_the_rate_distortion_legend_hides_no_point_and_betas_are_labelled_only_where_they_differ():
    # Seven configurations, the legend's length that once covered a point in the axes' corner.
    entries = [_entry(f"reg{i}", 1.0, 0, **{"recon NLL": 48.0 + 2 * i, "KL": 47.0 - 3 * i}) for i in range(7)]
    fig = rate_distortion_figure(summary_rows(entries))
    fig.canvas.draw()
    (ax,), (legend,) = fig.axes, fig.legends
    axes_box, legend_box = ax.get_window_extent(), legend.get_window_extent()
    assert legend_box.y1 <= axes_box.y0  # below the axes, not over them
    assert len(legend.get_texts()) == 7
    assert not ax.texts and ax.get_title().endswith("β = 1")
    betas = summary_rows([_entry("kl", 1.0, 0, **{"recon NLL": 60.0, "KL": 30.0}),
                          _entry("kl", 2.0, 0, **{"recon NLL": 70.0, "KL": 20.0})])
    two = rate_distortion_figure(betas)
    assert sorted(t.get_text() for t in two.axes[0].texts) == ["β=1", "β=2"]
    for f in (fig, two):
        pictures.pyplot().close(f)


def test_a_title_names_up_to_three_configurations_and_counts_more():
    three = [_entry(reg, 1.0, seed) for reg in ("bhattacharyya", "kl", "mmd") for seed in (0, 1)]
    assert title(three) == "bdvae comparison: bhattacharyya vs kl vs mmd"
    assert title(three + [_entry("wasserstein", 1.0, 0)]) == "bdvae comparison of 4 configurations"


def test_negative_numbers_take_one_minus_sign():
    assert number(-43.234, 2) == "\u221243.23" and number(-0.001, 2) == "0.00" and number(3.5, 1) == "3.5"
    assert minus_signs("so -ln p(x) = -85.2, gmm-10 and two_stage-kl, rate-distortion") == (
        "so \u2212ln p(x) = \u221285.2, gmm-10 and two_stage-kl, rate-distortion")
    entries = [_entry("kl", 1.0, s, **{"‖mean q(z)‖": 0.2, "cov eig min": -0.01 * (s + 1)}) for s in range(2)]
    entries[0].metrics["likelihood_note"] = "so -ln p(x) compares"
    text = markdown(entries, summary_rows(entries), Path("."))
    tables = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| kl | 1 | 2 | 0.200 ± 0.000 | \u22120.015 ± 0.007 |") for line in tables)
    assert not any(re.search(r"(?<!\w)-\d", line) for line in tables)  # no hyphen-minus before a digit in a table
    assert "\u2212ln p(x) compares" in text and "-ln" not in text


def test_markdown_and_html_give_the_same_sections_in_the_same_order():
    entries = [_entry(reg, 1.0, 0, **{"recon NLL": 50.0}) for reg in ("bhattacharyya", "kl")]
    for e in entries:
        e.metrics["samplers"] = {"prior": {}, "gmm-10": {}}  # fitted samplers: their sections too
    rows = summary_rows(entries)
    md = re.findall(r"^## (.+)$", markdown(entries, rows, Path(".")), re.MULTILINE)
    page = [html.unescape(h) for h in re.findall(r"<h2>(.+?)</h2>", html_page(entries, rows, Path(".")))]
    assert md == page
    assert md[:5] == ["What was compared", "Likelihood and reconstruction", "Prior match: q(z) against N(0, I)",
                      "Sample quality of z ~ N(0, I)", "Notes"]
    assert {"Samplers", "Rate–distortion", "Pictures (first seed of each configuration)"} <= set(md)


def test_every_column_has_a_theme_and_a_header_with_its_direction():
    for f in COLUMNS:
        assert f.theme in THEMES, f.column
    for f in COLUMNS + SAMPLER_COLUMNS:
        assert f.better in ("", "↓", "↑") and heading(f)[0] == (f"{f.column} {f.better}" if f.better else f.column)
    assert sum(len(theme_columns(t)) for t in THEMES) == len(COLUMNS)
    assert max(len(theme_columns(t)) for t in THEMES) <= 6  # with the 3 leading columns, a table fits a page


def test_a_mean_over_seeds_evaluated_with_different_k_is_flagged():
    def entry(reg, seed, k):
        metrics = {"iwae_nll": {"mean": 85.0, "k": k}, "test_images": 10000, "prior_match": {"mmd2_null": 3e-5}}
        return Entry(reg, 1.0, seed, Path("."), metrics)

    same = [entry("kl", 0, 5000), entry("kl", 1, 5000), entry("bhattacharyya", 0, 1000), entry("bhattacharyya", 1, 1000)]
    text = markdown(same, summary_rows(same), Path("."))
    assert "Evaluation settings differ between runs" in text and "mixes seeds" not in text  # each mean is of one K
    assert ("- **IWAE −ln p(x)**: importance samples per test image: K = 5,000 (kl β=1 seed 0, kl β=1 seed 1); "
            "1,000 (bhattacharyya β=1 seed 0, bhattacharyya β=1 seed 1)") in text
    mixed = [*same[:3], entry("bhattacharyya", 1, 5000)]
    text = markdown(mixed, summary_rows(mixed), Path("."))
    assert ("The mean ± std of bhattacharyya β=1 mixes seeds evaluated in different settings: "
            "read its figures seed by seed.") in text
    assert "importance samples per test image: K = 5,000 (3 runs); 1,000 (bhattacharyya β=1 seed 0)" in text
    assert "decoder ran in" not in text  # no dtype recorded, nothing to say


def test_seeds_whose_iwae_decoder_ran_in_different_dtypes_are_named():
    def entry(seed, dtype):
        metrics = {"iwae_nll": {"mean": 85.0, "k": 5000, "dtype": dtype}, "test_images": 10000,
                   "prior_match": {"mmd2_null": 3e-5}}
        return Entry("kl", 1.0, seed, Path("."), metrics)

    same = [entry(0, "bf16"), entry(1, "bf16")]
    assert "decoder ran in" not in markdown(same, summary_rows(same), Path("."))
    mixed = [entry(0, "bf16"), entry(1, "fp32"), entry(2, "bf16")]
    assert ("The IWAE's decoder ran in bf16 for kl β=1 seed 0, kl β=1 seed 2; in fp32 for kl β=1 seed 1 "
            "(bdvae evaluate --dtype;") in markdown(mixed, summary_rows(mixed), Path("."))


PUBLISHED = Path(__file__).resolve().parents[1] / "docs/results/quality-preset/runs"


def test_the_report_of_published_runs_says_what_they_are(tmp_path):
    """`bdvae report` on the quality preset's published runs, whose metrics.json name the IWAE's
    arithmetic "precision" (as bdvae first did): the header gives their dataset, image shape,
    preset, epochs, likelihood, K and sample counts; the old key reads as "dtype"."""
    runs = sorted(PUBLISHED.iterdir())
    assert all('"precision": "' in (r / "metrics.json").read_text() for r in runs)  # the old format
    result = run_cli("report", *map(str, runs), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "report.md").read_text()
    facts = dict(re.findall(r"^- \*\*(.+?)\*\*: (.+)$", md, re.MULTILINE))
    assert facts["dataset"].startswith("mnist, images 1×32×32 (channels×height×width), 60,000 training images; "
                                       "10,000 test images")
    assert facts["model"] == ("the quality preset: resnet (widths 32/64/128, 1 residual block per resolution), "
                              "32 latent dimensions")
    assert facts["training"] == "36 epochs, batch 128, likelihood bernoulli_binarized"
    assert facts["IWAE −ln p(x)"] == "importance samples per test image: K = 5,000 (4 runs); 1,000 (bhattacharyya β=2 seed 0)"
    assert facts["sample quality"] == "10,000 decoded samples against the 10,000 test images"
    assert facts["bdvae"] == f"trained with 0.1.0; evaluated with an unrecorded version; this report by {__version__}"
    assert re.fullmatch(r"evaluated \(the runs' metrics.json record no date\); this report written \d{4}-\d\d-\d\d \d\d:\d\d UTC", facts["dates"])
    # The old "precision" key, read as dtype: the runs decoded in bf16 and in fp32 are named.
    assert ("The IWAE's decoder ran in bf16 for bhattacharyya β=1 seed 0, bhattacharyya β=1 seed 1, kl β=1 seed 0; "
            "in fp32 for bhattacharyya β=2 seed 0, kl β=1 seed 1") in md
    page = (tmp_path / "report.html").read_text()
    assert "<th>model</th><td>the quality preset: resnet" in page and "1×32×32" in page
    assert md.count("**") >= 2 * 10 and page.count('class="best"') >= 10  # bests marked in both


def test_the_report_names_a_resnet_s_group_norm():
    quality = config_lib.load(preset="quality")
    assert architecture(quality) == "resnet (widths 32/64/128, 1 residual block per resolution), 32 latent dimensions"
    grouped = config_lib.load(preset="quality", overrides=["model.norm=group"])
    assert architecture(grouped) == ("resnet (widths 32/64/128, 1 residual block per resolution, GroupNorm), "
                                     "32 latent dimensions")


def test_the_report_takes_runs_evaluated_before_the_samplers_and_refuses_one_lacking_a_figure(tmp_path):
    """The β sweep's published runs were evaluated before bdvae had samplers (no "samplers" in
    their metrics.json, the prior's scores at its top level): their report has every table but the
    samplers'. A metrics.json that lacks one of the run's own figures is still one line."""
    sweep = sorted((PUBLISHED.parent.parent / "beta-sweep" / "runs").iterdir())
    assert sweep and not any('"samplers"' in (r / "metrics.json").read_text() for r in sweep)
    result = run_cli("report", *map(str, sweep), "--out", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Sample quality of z ~ N(0, I)" in md and "## Samplers" not in md
    assert "| kl | 1 | 1 | **572.6** |" in md  # KL β = 1's prior Fréchet distance, the best of the six
    damaged = tmp_path / "damaged"
    shutil.copytree(sweep[0], damaged)
    metrics = json.loads((damaged / "metrics.json").read_text())
    del metrics["prior_match"]
    (damaged / "metrics.json").write_text(json.dumps(metrics))
    result = run_cli("report", str(damaged), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "its metrics.json lacks prior_match" in result.stderr, result.stderr


def test_compare_reuses_an_evaluation_whose_metrics_json_has_the_old_key(tmp_path, monkeypatch):
    from bdvae import comparison as compare_module
    from bdvae.evaluation import EvalOptions

    run_dir = tmp_path / "kl-beta1-seed0"
    shutil.copytree(PUBLISHED / "kl-beta1-seed0", run_dir)
    # Its fitted samplers' arrays are not published: keep the prior's scores only, as an evaluation
    # with --samplers prior would have written them.
    old = json.loads((run_dir / "metrics.json").read_text())
    old["options"]["samplers"], old["samplers"] = ["prior"], {"prior": old["samplers"]["prior"]}
    (run_dir / "metrics.json").write_text(json.dumps(old))
    assert old["options"]["precision"] == "auto" and old["iwae_nll"]["precision"] == "bf16"
    monkeypatch.setattr(compare_module, "evaluate_run", lambda *a, **k: pytest.fail("evaluated again"))
    options = EvalOptions(k=5000)
    metrics = compare_module.ensure_evaluated(run_dir, options, progress=False, log=print)
    assert metrics["options"]["dtype"] == "auto" and metrics["iwae_nll"]["dtype"] == "bf16"
    assert "precision" not in metrics["options"] and metrics["iwae_nll"]["mean"] == pytest.approx(84.05, abs=0.01)
    # Another dtype is another evaluation.
    called = []
    monkeypatch.setattr(compare_module, "evaluate_run", lambda *a, **k: called.append(a) or {})
    compare_module.ensure_evaluated(run_dir, EvalOptions(k=5000, samplers=options.samplers, dtype="fp32"),
                                    progress=False, log=print)
    assert len(called) == 1


@pytest.mark.slow
def test_two_compare_jobs_on_one_folder_train_each_run_once(mnist_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "bdvae", "compare", "--regularizers", "kl", "--seeds", "1", "--epochs", "1",
           "--out", str(out), "--data-dir", str(mnist_dir), "--set", "data.train_size=256", "-k", "2",
           "--samples", "200", "--test-size", "200", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    logs = "".join(stdout for stdout, _ in outputs)
    assert logs.count("kl-beta1-seed0: training") == 1 and logs.count("kl-beta1-seed0: finished run reused") == 1
    assert logs.count("kl-beta1-seed0: evaluating") == 1  # the second job reuses the first one's metrics too


def _copy_run(run_dir: Path, to: Path) -> Path:
    """A run's files without its weights, as docs/ keeps them: all `bdvae report` needs."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    return to


def test_report_of_runs_evaluated_apart_matches_compare_and_links_them_from_anywhere(compared, tmp_path):
    runs = sorted(p for p in (compared / "runs").iterdir() if not p.name.startswith("."))
    copies = [_copy_run(r, tmp_path / "kept" / r.name) for r in runs]
    out = tmp_path / "elsewhere" / "report"
    result = run_cli("report", *map(str, copies), "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = [line for line in (compared / "report.md").read_text().splitlines() if line.startswith("| ")]
    ours = (out / "report.md").read_text()
    assert table and all(line in ours for line in table if "![" not in line)  # the same figures, row for row
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", ours)
    assert len(links) == 1 + 2 * 4 and all((out / link).is_file() for link in links), links
    assert "../../kept/kl-beta1-seed0/samples.png" in links
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 + 2 * 4 and "missing" not in page
    assert "- **IWAE −ln p(x)**: importance samples per test image: K = 2\n" in ours
    assert "- **sample quality**: 300 decoded samples against the 300 test images\n" in ours
    assert "- **training**: 1 epoch, batch 64, likelihood bernoulli\n" in ours
    assert ("- **model**: custom (the reference preset with data.train_size = 512, train.epochs = 1, "
            "train.batch_size = 64): reference (widths 32/64/128), 16 latent dimensions") in ours

    # A run evaluated with another K: the notes say which figure is which bound.
    metrics = json.loads((copies[0] / "metrics.json").read_text())
    metrics["iwae_nll"]["k"] = 7
    (copies[0] / "metrics.json").write_text(json.dumps(metrics))
    result = run_cli("report", *map(str, copies), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert ("- **IWAE −ln p(x)**: importance samples per test image: K = 2 (3 runs); 7 (bhattacharyya β=1 seed 0)\n"
            in (out / "report.md").read_text())
    assert "Evaluation settings differ between runs (see above)" in (out / "report.md").read_text()
    assert "The mean ± std of bhattacharyya β=1 mixes seeds" in (out / "report.md").read_text()  # its two seeds' K differ


def test_report_refuses_runs_it_cannot_compare_in_one_line_and_keeps_an_earlier_report(compared, tmp_path):
    run = compared / "runs" / "kl-beta1-seed0"
    unevaluated = _copy_run(run, tmp_path / "unevaluated")
    (unevaluated / "metrics.json").unlink()
    other_model = _copy_run(run, tmp_path / "other")
    config = (other_model / "config.toml").read_text()
    (other_model / "config.toml").write_text(config.replace("lr = 0.001", "lr = 0.01"))
    assert "lr = 0.01" in (other_model / "config.toml").read_text()
    whole_data = _copy_run(run, tmp_path / "whole-data")  # no train_size: every training image
    config = (whole_data / "config.toml").read_text()
    (whole_data / "config.toml").write_text(config.replace("train_size = 512\n", ""))
    assert "train_size" not in (whole_data / "config.toml").read_text()
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    for args, message in [
        ([str(run), "--out", str(tmp_path / "r1")], None),
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")], "not a run directory (no config.toml)"),
        ([str(unevaluated), "--out", str(tmp_path / "r3")], "not evaluated; run `bdvae evaluate"),
        ([str(run), str(other_model), "--out", str(tmp_path / "r4")], "train.lr is 0.01, "),
        ([str(run), str(_copy_run(run, tmp_path / "twin")), "--out", str(tmp_path / "r5")], "both are kl, β=1, seed 0"),
        ([str(run), str(whole_data), "--out", str(tmp_path / "r6")], f"data.train_size is unset, {run} has 512; "),
        ([str(run), "--out", str(out)], "holds a report (report.md); pass --overwrite"),
    ]:
        result = run_cli("report", *args)
        if message is None:
            assert result.returncode == 0, result.stderr
            continue
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert (out / "report.md").read_text() == "an earlier report"
    assert not any((tmp_path / f"r{i}").exists() for i in range(2, 7))
