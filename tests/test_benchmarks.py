"""benchmarks/performance.py survives its own parts: it checks its inputs before timing anything,
and a part that fails leaves what the parts before it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PERFORMANCE = Path(__file__).resolve().parents[1] / "benchmarks" / "performance.py"


def _performance(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PERFORMANCE), "--smoke", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, check=False)


def test_a_missing_run_stops_it_before_anything_is_timed(tmp_path):
    result = _performance("--skip-training", "--run", str(tmp_path / "no-run"), "--json", str(tmp_path / "p.json"),
                          cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"performance.py: {tmp_path / 'no-run'}: not a finished run (no config.toml); the likelihood and evaluate "
        "part(s) need a trained run: give --run RUN (e.g. one trained by `bdvae train`), or --skip-likelihood "
        "--skip-evaluate"]
    assert not (tmp_path / "p.json").exists() and "train img/s" not in result.stdout


@pytest.mark.slow
def test_a_failing_part_keeps_what_the_parts_before_it_measured(trained_run, tmp_path):
    result = _performance("--contenders", "bdvae,minimal", "--skip-likelihood", "--run", str(trained_run),
                          "--evaluate-arg=--no-such-flag", "--json", str(tmp_path / "p.json"), cwd=tmp_path)
    assert result.returncode != 0
    assert "performance.py: the evaluate part failed" in result.stderr and "--no-such-flag" in result.stderr
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["failed"]["part"] == "evaluate" and "evaluate" not in saved
    assert set(saved["training"]["medians"]) == {"bdvae", "minimal"}  # the training part's figures are kept
    assert all(rate > 0 for rates in saved["training"]["rates"].values() for rate in rates)
    assert "train img/s, bdvae" in result.stdout  # and printed


def test_the_fp32_levers_compute_the_plain_layers_function(monkeypatch):
    monkeypatch.syspath_prepend(str(PERFORMANCE.parent))
    import fp32_levers

    fp32_levers.check_same_function()  # outputs and gradients equal in float64
    # ... and the check can fail: a form that drops the bias is caught.
    form = fp32_levers.sub_pixel_conv_transpose
    monkeypatch.setattr(fp32_levers, "sub_pixel_conv_transpose", lambda x, w, b: form(x, w, b * 0))
    with pytest.raises(AssertionError):
        fp32_levers.check_same_function()
