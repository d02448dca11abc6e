"""Tracking: callbacks hear every step, checkpoint and epoch; TensorBoard's own reader finds the
figures of metrics.jsonl, the pictures and histograms; a resumed run's curves have no duplicate
points; tracking changes nothing of the training."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import bdvae
from bdvae import rundir
from bdvae.config import Config, DataConfig, TrainConfig

from conftest import run_rows, tiny_npz

STEPS_PER_EPOCH = 4  # 128 training images, batch 32


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """128 random images for training, 64 for testing."""
    return tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz", train=128, test=64, seed=0)


def _config(data_file: Path, **train: object) -> Config:
    return Config(data=DataConfig(name="npz", path=str(data_file)),
                  train=TrainConfig(**{"epochs": 2, "batch_size": 32, "checkpoint_every": 3, "log_every": 1, "threads": 1,
                                       **train}))


class Recorder(bdvae.Callback):
    def __init__(self) -> None:
        self.steps, self.checkpoints, self.epochs, self.ends = [], [], [], []

    def on_step(self, step, figures):
        self.steps.append((step, figures))

    def on_checkpoint(self, step):
        self.checkpoints.append(step)

    def on_epoch_end(self, epoch, figures, view):
        mu, logvar = view.posterior(view.test_images[:5])
        self.epochs.append((epoch, figures, view.step, tuple(mu.shape), tuple(view.decode(mu).shape)))

    def on_train_end(self, run_dir, rows):
        self.ends.append((run_dir, rows))


def test_callbacks_hear_every_step_checkpoint_and_epoch(data_file, tmp_path):
    recorder = Recorder()
    run_dir = bdvae.train(_config(data_file), tmp_path / "run", progress=False, callbacks=[recorder])
    rows = run_rows(run_dir)
    assert [step for step, _ in recorder.steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for _, figures in recorder.steps:
        assert set(figures) == {"loss", "recon_nll", "reg", "lr", "beta", "grad_norm"}
        assert figures["lr"] == 1e-3 and figures["beta"] == 1.0 and figures["grad_norm"] > 0
        assert figures["loss"] == pytest.approx(figures["recon_nll"] + figures["reg"])
    # A state every 3 steps within an epoch, and one at each epoch's end (steps 4 and 8).
    assert recorder.checkpoints == [3, 4, 6, 8]
    assert [(epoch, step) for epoch, _, step, _, _ in recorder.epochs] == [(1, 4), (2, 8)]
    assert [figures for _, figures, _, _, _ in recorder.epochs] == rows  # the rows of metrics.jsonl
    assert recorder.epochs[0][3:] == ((5, 16), (5, 1, 32, 32))
    assert recorder.ends == [(run_dir, rows)]


def test_log_every_spaces_the_step_figures(data_file, tmp_path):
    recorder = Recorder()
    bdvae.train(_config(data_file, log_every=3), tmp_path / "run", progress=False, callbacks=[recorder])
    assert [step for step, _ in recorder.steps] == [3, 6]


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / rundir.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0,
                                                                                        "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_the_runs_figures_pictures_and_histograms(data_file, tmp_path):
    pytest.importorskip("tensorboard")
    tracked = bdvae.train(_config(data_file, tensorboard=True), tmp_path / "tracked", progress=False)
    plain = bdvae.train(_config(data_file), tmp_path / "plain", progress=False)
    events, rows = _events(tracked), run_rows(tracked)
    tags = events.Tags()
    assert {"step/loss", "step/recon_nll", "step/reg", "step/lr", "step/beta", "step/grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for name in ("train_loss", "test_loss", "test_recon_nll", "test_kl", "test_bhattacharyya"):
        scalars = events.Scalars(f"epoch/{name}")
        assert [e.step for e in scalars] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
        assert [e.value for e in scalars] == pytest.approx([row[name] for row in rows], rel=1e-6)  # float32 on disk
    assert set(tags["images"]) == {"samples", "reconstructions"}
    assert len(events.Images("samples")) == 2
    assert (events.Images("samples")[0].width, events.Images("samples")[0].height) == (8 * 34 + 2, 8 * 34 + 2)
    assert set(tags["histograms"]) == {"posterior/mu", "posterior/logvar"}
    assert events.Histograms("posterior/mu")[0].histogram_value.num == 64 * 16  # 64 test images, 16 dimensions
    # Tracking reads the model and changes nothing of it: the same weights, bit for bit, as without.
    ours, theirs = load_file(str(tracked / rundir.WEIGHTS_FILE)), load_file(str(plain / rundir.WEIGHTS_FILE))
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    assert not (plain / rundir.TENSORBOARD_DIR).exists()


@pytest.mark.parametrize("last_state", [6, None])  # None: stopped before its first training state
def test_a_resumed_run_continues_its_curves_without_duplicate_points(data_file, tmp_path, last_state):
    pytest.importorskip("tensorboard")
    finished = bdvae.train(_config(data_file, tensorboard=True), tmp_path / "finished", progress=False)
    # The run as it was when stopped after its last training state: its event file logged every
    # step to the end, as a run killed after that state had gone on logging.
    stopped = tmp_path / "stopped"
    shutil.copytree(finished, stopped)
    for name in (rundir.RUN_FILE, rundir.WEIGHTS_FILE):
        (stopped / name).unlink()
    for path in rundir.state_paths(stopped):
        if last_state is None or path.name > f"step-{last_state:09d}.safetensors":
            path.unlink()
    assert [p.name for p in rundir.state_paths(stopped)][-1:] == ([] if last_state is None else
                                                                  [f"step-{last_state:09d}.safetensors"])
    bdvae.resume(stopped, progress=False)
    before, after = _events(finished), _events(stopped)
    for tag in ("step/loss", "step/grad_norm", "epoch/test_loss"):
        steps = [e.step for e in after.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: a step logged twice: {steps}"
        assert steps == [e.step for e in before.Scalars(tag)]
        assert [e.value for e in after.Scalars(tag)] == [e.value for e in before.Scalars(tag)]  # bit-exact resume
    assert [e.step for e in after.Images("samples")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_tensorboard_without_its_package_is_one_line(data_file, tmp_path):
    script = ("import sys; sys.modules['tensorboard'] = None; from bdvae.__main__ import main; "
              f"sys.exit(main(['train', '--out', {str(tmp_path / 'run')!r}, '--set', 'data.name=\"npz\"', "
              f"'--set', 'data.path={data_file}', '--set', 'train.tensorboard=true', '--quiet']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr == ("bdvae: error: train.tensorboard = true needs the tensorboard package: "
                             "pip install 'bdvae[tensorboard]' (or pip install tensorboard)\n")
    assert not (tmp_path / "run").exists()  # refused before anything was written
