"""`bdvae compare` end to end on a tiny configuration; reuse of finished runs; the report's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bdvae.compare import Entry, gpu_slots
from bdvae.report import markdown_table, summary_rows
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
    # Each worker prints its run's lines in order ("NAME: training" ... "NAME: evaluating"); the
    # parent's "done" lines lag behind them, so overlap is read from the workers' own lines.
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
