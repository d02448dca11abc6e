"""Shared fixtures: the real MNIST, fetched once per test session by the real command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`bdvae ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "bdvae", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def tiny_npz(path: Path, train: int, test: int, seed: int) -> Path:
    """A dataset of random 28x28 images (`data.name = "npz"`), for fast tests of what does not
    need digits: training, tracking, the API, faults."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (train, 28, 28), dtype=np.uint8), y_train=np.zeros(train, np.int64),
             x_test=rng.integers(0, 256, (test, 28, 28), dtype=np.uint8), y_test=np.zeros(test, np.int64))
    return path


def run_files(run_dir: Path) -> list[str]:
    """Every file of a run directory, as paths relative to it, sorted."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def run_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_rows_close(rows: list[dict], ref_rows: list[dict], rel: float = 1e-3) -> None:
    """The same epochs, with every number but the wall time within `rel` of the reference's."""
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        for key, value in ref.items():
            if key != "seconds":
                assert row[key] == pytest.approx(value, rel=rel), key


def interrupted_copy(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished 2-epoch run of 8 steps an epoch and a training state every 3 steps, as
    it was at its second-newest training state (7 steps into epoch 2)."""
    from bdvae.rundir import RUN_FILE, WEIGHTS_FILE, state_paths

    shutil.copytree(run_dir, dest)
    for name in (RUN_FILE, WEIGHTS_FILE):
        (dest / name).unlink()
    *_, kept, newest = state_paths(dest)
    newest.unlink()
    assert kept.name == "step-000000015.safetensors"
    return dest


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


# Fixtures that train or evaluate on the real MNIST (seconds to tens of seconds, once per session
# or module): every test that needs one is `slow`, as are the tests marked so because they train
# by themselves. `python -m pytest -m "not slow"` leaves them all out.
TRAINING_FIXTURES = {"trained_run", "evaluated", "compared", "reference", "single", "two_processes", "cpu_run",
                     "device_run", "device_step_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
