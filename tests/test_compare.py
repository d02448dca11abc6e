"""`bdvae compare` end to end on a tiny configuration; reuse of finished runs; the report's numbers."""

from __future__ import annotations

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

from bdvae.compare import Entry, gpu_slots
from bdvae.report import markdown, markdown_table, summary_line, summary_rows
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
    assert md.count("| bhattacharyya | 1 | 2 |") == 1 and md.count("| kl | 1 | 2 |") == 1
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


def test_a_run_differing_only_in_where_the_data_is_cached_or_its_threads_is_reused(tmp_path):
    from dataclasses import replace

    from bdvae import rundir
    from bdvae.compare import ensure_trained
    from bdvae.config import Config
    from bdvae.errors import BdvaeError

    config = Config()
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_config(run, replace(config, data=replace(config.data, data_dir=str(tmp_path / "another-cache")),
                                     train=replace(config.train, threads=1)))
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
    (["--device", "gpu"], "--device must be one of auto, cpu, cuda, got 'gpu'"),
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
    mean, std = rows[0]["cells"]["recon NLL ↓"]
    assert mean == 12.0 and std == pytest.approx(2 ** 1.5)  # sample std of 10 and 14
    assert rows[0]["cells"]["KL"] is None
    table = markdown_table(rows)
    assert "| bhattacharyya | 1 | 2 | 12.00 ± 2.83 |" in table and "| kl | 1 | 1 | 7.00 |" in table
    assert summary_line(rows).startswith("2 configurations, 1/2 seeds each; mean ± std over seeds;")
    assert summary_line(rows[1:]).startswith("1 configuration, 1 seed each; one seed, so no spread over seeds;")


def test_a_mean_over_seeds_evaluated_with_different_k_is_flagged():
    def entry(reg, seed, k):
        metrics = {"iwae_nll": {"mean": 85.0, "k": k}, "test_images": 10000, "prior_match": {"mmd2_null": 3e-5}}
        return Entry(reg, 1.0, seed, Path("."), metrics)

    same = [entry("kl", 0, 5000), entry("kl", 1, 5000), entry("bhattacharyya", 0, 1000), entry("bhattacharyya", 1, 1000)]
    text = markdown(same, summary_rows(same), Path("."))
    assert "Evaluation settings differ between runs" in text and "mixes seeds" not in text  # each mean is of one K
    mixed = [*same[:3], entry("bhattacharyya", 1, 5000)]
    text = markdown(mixed, summary_rows(mixed), Path("."))
    assert ("The mean ± std of bhattacharyya β=1 mixes seeds evaluated in different settings: "
            "read its figures seed by seed.") in text
    assert "decoder ran in" not in text  # no precision recorded, nothing to say


def test_seeds_whose_iwae_decoder_ran_in_different_precisions_are_named():
    def entry(seed, precision):
        metrics = {"iwae_nll": {"mean": 85.0, "k": 5000, "precision": precision}, "test_images": 10000,
                   "prior_match": {"mmd2_null": 3e-5}}
        return Entry("kl", 1.0, seed, Path("."), metrics)

    same = [entry(0, "bf16"), entry(1, "bf16")]
    assert "decoder ran in" not in markdown(same, summary_rows(same), Path("."))
    mixed = [entry(0, "bf16"), entry(1, "fp32"), entry(2, "bf16")]
    assert ("The IWAE's decoder ran in bf16 for kl β=1 seed 0, kl β=1 seed 2; in fp32 for kl β=1 seed 1 "
            "(bdvae evaluate --precision;") in markdown(mixed, summary_rows(mixed), Path("."))


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
    assert "Each run evaluated with IWAE K = 2 importance samples per image, 300 test images, 300 decoded samples scored." in ours

    # A run evaluated with another K: the notes say which figure is which bound.
    metrics = json.loads((copies[0] / "metrics.json").read_text())
    metrics["iwae_nll"]["k"] = 7
    (copies[0] / "metrics.json").write_text(json.dumps(metrics))
    result = run_cli("report", *map(str, copies), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert ("Evaluation settings differ between runs: IWAE K = 7 importance samples per image, 300 test images, 300 decoded "
            "samples scored for bhattacharyya β=1 seed 0; IWAE K = 2 importance samples per image, 300 test images, 300 decoded "
            "samples scored for bhattacharyya β=1 seed 1, kl β=1 seed 0, kl β=1 seed 1.") in (out / "report.md").read_text()
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
