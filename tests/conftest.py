"""Shared fixtures: the real MNIST, fetched once per test session by the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`bdvae ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "bdvae", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A data cache holding the verified MNIST, filled by `bdvae data fetch mnist` (from the
    folder of IDX files that BDVAE_TEST_MNIST_SOURCE names, on a machine that cannot download)."""
    data_dir = tmp_path_factory.mktemp("data")
    source = os.environ.get("BDVAE_TEST_MNIST_SOURCE")
    result = run_cli("data", "fetch", "mnist", "--data-dir", str(data_dir), *(["--source-dir", source] if source else []))
    assert result.returncode == 0, result.stderr
    assert "mnist: fetched from " in result.stdout  # it names its source
    return data_dir


@pytest.fixture(scope="session")
def trained_run(mnist_dir, tmp_path_factory) -> Path:
    """A small real run (12,000 images, 3 epochs), trained once per session by `bdvae train`.
    Tests that write into a run directory work on a copy."""
    run_dir = tmp_path_factory.mktemp("runs") / "bd"
    result = run_cli("train", "--data-dir", str(mnist_dir), "--out", str(run_dir), "--quiet",
                     "--set", "data.train_size=12000", "--set", "data.test_size=1000", "--set", "train.epochs=3",
                     "--set", "train.batch_size=64")
    assert result.returncode == 0, result.stderr
    return run_dir
