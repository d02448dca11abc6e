"""Exact resume: a training killed with SIGKILL and resumed ends with the same weights, bit for bit,
as one never interrupted; a damaged newest checkpoint falls back to the one before it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_rows

SMALL = ["--set", "data.train_size=2048", "--set", "data.test_size=256", "--set", "train.epochs=3",
         "--set", "train.batch_size=64", "--set", "train.checkpoint_every=5", "--set", "train.threads=1", "--quiet"]


def _train(mnist_dir, out, *extra):
    return run_cli("train", "--data-dir", str(mnist_dir), "--out", str(out), *SMALL, *extra)


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    result = _train(mnist_dir, out)
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_run(run_dir, reference):
    ours, theirs = load_file(str(run_dir / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name  # bit for bit
    rows, ref_rows = run_rows(run_dir), run_rows(reference)
    assert [r["epoch"] for r in rows] == list(range(1, len(ref_rows) + 1)) and len(ref_rows) >= 2  # each epoch once
    for row, ref in zip(rows, ref_rows):
        assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in ref.items() if k != "seconds"}


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(mnist_dir, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bdvae", "train", "--data-dir", str(mnist_dir), "--out", str(out), *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until training is under way
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # then a moment nobody chose
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if (out / "run.json").exists():
        pytest.skip("training finished before the kill landed; nothing to resume")
    assert proc.returncode == -signal.SIGKILL
    result = run_cli("train", "--resume", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch" in result.stdout or "starting from the beginning" in result.stdout
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(mnist_dir, reference, tmp_path):
    out = tmp_path / "damaged"
    result = _train(mnist_dir, out, "--set", "train.epochs=1")  # stops after epoch 1 of the same run
    assert result.returncode == 0, result.stderr
    # Make it an interrupted 3-epoch run: the config says 3 epochs, the final files are gone.
    (out / "config.toml").write_text((reference / "config.toml").read_text().replace(
        str(reference), str(out)))
    (out / "run.json").unlink()
    (out / "model.safetensors").unlink()
    states = sorted((out / "checkpoints").glob("*.safetensors"))
    assert len(states) == 2
    raw = bytearray(states[-1].read_bytes())
    raw[-10] ^= 0xFF  # one flipped bit pattern in the tensor data
    states[-1].write_bytes(bytes(raw))
    result = run_cli("train", "--resume", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"{states[-1]}: damaged checkpoint (checksum mismatch); trying the one before it" in result.stdout
    _assert_same_run(out, reference)


@pytest.mark.slow
def test_the_quality_preset_resumes_exactly(mnist_dir, tmp_path):
    # Its BatchNorm statistics and its cosine learning rate must come back with the training state.
    whole = tmp_path / "whole"
    result = _train(mnist_dir, whole, "--preset", "quality", "--set", "train.epochs=2", "--set", "data.train_size=640",
                    "--set", "objective.warmup_steps=8")
    assert result.returncode == 0, result.stderr
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("run.json", "model.safetensors", *(p.name for p in sorted((cut / "checkpoints").glob("*"))[-1:])):
        (cut / ("checkpoints" if name.startswith("step-") else "") / name).unlink()
    result = run_cli("train", "--resume", str(cut), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch 2, image 320 of 640" in result.stdout  # inside the last epoch, past its first steps
    _assert_same_run(cut, whole)


@pytest.mark.slow
def test_resume_errors_are_one_line(reference, tmp_path):
    finished = run_cli("train", "--resume", str(reference))
    assert finished.returncode == 2 and "the run is finished already" in finished.stderr
    empty = run_cli("train", "--resume", str(tmp_path))
    assert empty.returncode == 2 and "nothing to resume (no config.toml)" in empty.stderr
    mixed = run_cli("train", "--resume", str(reference), "--set", "train.epochs=5")
    assert mixed.returncode == 2 and "it takes no --set" in mixed.stderr
    for r in (finished, empty, mixed):
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(reference, tmp_path):

    out = tmp_path / "other"
    shutil.copytree(reference, out)
    (out / "run.json").unlink()
    config = (out / "config.toml").read_text()
    assert 'arch = "reference"' in config
    (out / "config.toml").write_text(config.replace('arch = "reference"', 'arch = "mlp"'))
    result = run_cli("train", "--resume", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    assert "the checkpoint does not fit this run's config" in result.stderr and "Traceback" not in result.stderr
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def _faulty_loss_terms(monkeypatch, bad_step: int):
    """Make the real objective return NaN on the `bad_step`-th call, as a numerical fault would."""
    from bdvae import objective

    real = objective.loss_sums
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        sums = real(*args, **kwargs)  # loss, recon_nll, reg
        calls["n"] += 1
        if calls["n"] == bad_step:
            return sums * torch.tensor([float("nan"), float("nan"), 1.0], device=sums.device)
        return sums

    monkeypatch.setattr(objective, "loss_sums", faulty)  # what Objective, the training step's module, calls


def _small_config(mnist_dir, **train):
    from bdvae.config import Config, DataConfig, TrainConfig

    return Config(data=DataConfig(data_dir=str(mnist_dir), train_size=512, test_size=64),
                  train=TrainConfig(epochs=2, batch_size=64, checkpoint_every=5, threads=1, **train))


@pytest.mark.parametrize("step", ["host", "device"])  # the device step finds it at the next checkpoint point (15)
def test_a_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_dir, tmp_path, monkeypatch, step):
    import math

    import bdvae
    from bdvae.rundir import state_paths
    from bdvae.states import load as load_state
    from bdvae.errors import BdvaeError

    _faulty_loss_terms(monkeypatch, bad_step=12)
    with pytest.raises(BdvaeError) as err:
        bdvae.train(_small_config(mnist_dir, step=step), tmp_path / "nan", progress=False)
    message = str(err.value)
    assert message.startswith("step 12: non-finite loss or gradient (loss=nan, recon_nll=nan, reg=")
    kept = state_paths(tmp_path / "nan")
    assert f"the last good checkpoint {kept[-1]} is kept" in message and kept[-1].name == "step-000000010.safetensors"
    tensors, state = load_state(kept[-1])
    assert state["global_step"] == 10 and all(bool(t.isfinite().all()) for k, t in tensors.items() if k.startswith("model."))
    assert not (tmp_path / "nan" / "run.json").exists()
    assert "\n" not in message and not math.isnan(state["rows"][0]["train_loss"])  # epoch 1 (8 steps) was fine


@pytest.mark.parametrize("step", ["host", "device"])
def test_skip_nonfinite_skips_and_counts_the_bad_batch(mnist_dir, tmp_path, monkeypatch, step):
    import bdvae
    from safetensors.torch import load_file

    _faulty_loss_terms(monkeypatch, bad_step=3)
    run_dir = bdvae.train(_small_config(mnist_dir, skip_nonfinite=True, step=step), tmp_path / "skip", progress=False)
    rows = run_rows(run_dir)
    assert [r["skipped_batches"] for r in rows] == [1, 0]
    assert all(v == v for r in rows for v in r.values())  # no NaN reached the metrics
    assert all(bool(t.isfinite().all()) for t in load_file(str(run_dir / "model.safetensors")).values())


@pytest.mark.slow
def test_a_checkpoint_from_another_version_is_refused_in_one_line(reference, tmp_path):
    """A training state written by a version whose state lacks fields this one needs."""

    from bdvae.rundir import save_state, state_paths
    from bdvae.states import load as load_state

    out = tmp_path / "old"
    shutil.copytree(reference, out)
    (out / "run.json").unlink()
    tensors, state = load_state(state_paths(out)[-1])
    for path in state_paths(out):
        path.unlink()
    del state["param_groups"], state["skipped"]  # as an older layout would lack them
    save_state(out, state["global_step"], tensors, {**state, "bdvae_version": "0.0.1"})
    result = run_cli("train", "--resume", str(out), "--quiet")
    assert result.returncode == 2
    assert "the checkpoint does not fit this run's config" in result.stderr and result.stderr.count("\n") == 1
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_a_restored_optimizer_keeps_the_weights_layout_and_values(tmp_path):
    """States are saved contiguous; Adam's moments come back channels-last like the weights they
    follow (as Adam made them before the save), the step count where Adam keeps it."""
    from bdvae.config import Config
    from bdvae.model import build_model
    from bdvae.rundir import latest_state, save_training_state
    from bdvae.states import Position, unpack as restore_training_state

    def fresh():
        torch.manual_seed(0)
        model = build_model(Config().model, Config().objective, (1, 32, 32)).to(memory_format=torch.channels_last)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    model, optimizer = fresh()
    model.decode(model.encode(torch.rand(4, 1, 32, 32))[0]).sum().backward()
    optimizer.step()
    save_training_state(tmp_path, model, optimizer, Position(global_step=1), torch.Generator().manual_seed(3))
    model2, optimizer2 = fresh()
    restored_generator = torch.Generator()
    restore_training_state(*latest_state(tmp_path, print), model2, optimizer2, restored_generator)
    assert restored_generator.get_state().equal(torch.Generator().manual_seed(3).get_state())
    for p, p2 in zip(model.parameters(), model2.parameters()):
        saved, restored = optimizer.state[p], optimizer2.state[p2]
        assert restored["step"].device == saved["step"].device and restored["step"].equal(saved["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert restored[name].equal(saved[name]) and restored[name].stride() == saved[name].stride() == p.stride()
