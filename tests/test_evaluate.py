"""`bdvae evaluate` end to end on a small real run, and its one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from bdvae.evaluate import EvalOptions, evaluate_run, likelihood_note
from bdvae.errors import BdvaeError
from conftest import run_cli


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(trained_run, run_dir)
    result = run_cli("evaluate", str(run_dir), "-k", "8", "--samples", "1000", "--quiet")
    assert result.returncode == 0, result.stderr
    return run_dir, result.stdout


def test_evaluate_writes_metrics_and_pictures(evaluated):
    run_dir, stdout = evaluated
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test_images"] == 10000  # all of them, whatever test_size the run was trained with
    assert m["iwae_nll"]["k"] == 8 and m["options"]["samples"] == 1000
    for picture in ("latent_histograms", "latent_means", "interpolation", "traversal"):
        assert f"eval/{picture}.png" in m["pictures"] and (run_dir / "eval" / f"{picture}.png").stat().st_size > 1000
    assert "-ln p(x), IWAE K=8" in stdout and "not a density of the data" in stdout
    assert not list(run_dir.glob(".*.tmp"))


def test_evaluate_numbers_hang_together(evaluated):
    run_dir, _ = evaluated
    m = json.loads((run_dir / "metrics.json").read_text())
    d = m["divergences"]
    assert d["kl"]["mean"] > d["bhattacharyya"]["mean"] > 0
    assert math.isclose(sum(d["kl_per_dim"]), d["kl"]["mean"], rel_tol=1e-4)
    assert math.isclose(sum(d["bhattacharyya_per_dim"]), d["bhattacharyya"]["mean"], rel_tol=1e-4)
    assert math.isclose(m["neg_elbo"]["mean"], m["reconstruction"]["nll"]["mean"] + d["kl"]["mean"], rel_tol=1e-6)
    # IWAE with K = 8 is a tighter bound than the ELBO: -ln p(x) below the negative ELBO, not absurdly so.
    assert m["neg_elbo"]["mean"] - 15 < m["iwae_nll"]["mean"] < m["neg_elbo"]["mean"]
    pm = m["prior_match"]
    assert 0 < pm["cov_eigenvalue_min"] <= pm["cov_eigenvalue_max"] and 0 <= pm["active_units"] <= 16
    assert pm["mmd2"] > abs(pm["mmd2_null"])  # a 3-epoch BD model's q(z) is measurably not N(0, I)
    sq = m["sample_quality"]
    assert sum(sq["class_counts"]) == 1000 and 1 <= sq["classifier_score"] <= 10
    assert 0 <= sq["precision"] <= 1 and 0 <= sq["recall"] <= 1 and sq["frechet_distance"] > 0


def test_evaluate_is_deterministic_given_the_seed(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    options = EvalOptions(k=4, samples=300, test_size=200, pictures=False)
    a = evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    b = evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    for key in ("iwae_nll", "neg_elbo", "reconstruction", "sample_quality"):
        assert {k: v for k, v in a[key].items() if k != "importance_samples_per_second"} == \
               {k: v for k, v in b[key].items() if k != "importance_samples_per_second"}
    assert a["test_images"] == 200


def test_binarized_models_are_scored_on_a_once_binarized_test_set():
    assert "Burda et al. 2015" in likelihood_note("bernoulli_binarized")
    assert "not a density" in likelihood_note("bernoulli")
    assert "density of the continuous" in likelihood_note("gaussian")


def test_option_ranges():
    with pytest.raises(BdvaeError, match="-k must be positive"):
        EvalOptions(k=0)
    with pytest.raises(BdvaeError, match="--seed must be in"):
        EvalOptions(seed=-1)


@pytest.mark.parametrize("args,message", [
    (["evaluate", "/nonexistent/run"], "not a finished run"),
    (["evaluate", "/nonexistent/run", "-k", "0"], "-k must be positive"),
    (["evaluate", "/nonexistent/run", "--samples", "-5"], "--samples must be at least 16"),
    (["evaluate", "/nonexistent/run", "--test-size", "3"], "--test-size must be at least 16"),
    (["classifier", "train", "--out", "/tmp", "--seed", "1"], "--out /tmp: is a folder"),
    (["classifier", "train", "--out", "/nonexistent/c.safetensors", "--seed", str(2**64)], "--seed must be in"),
    (["classifier", "train", "--out", "/nonexistent/dir/c.safetensors"], "folder /nonexistent/dir does not exist"),
])
def test_bad_input_is_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
