"""train.step = "device": the images, the draws, the loss sums and the non-finite checks stay on the
training device and the host does not wait for it every step. On a CPU it trains the model the
host step trains, resumes bit for bit, and takes over a host step's training state; "graph", which
a CPU cannot capture, falls back to it. The GPU's own checks, the capture's among them, are in
test_cuda.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from bdvae import rundir, states
from bdvae.config import Config, DataConfig, TrainConfig
from bdvae.distributed import Context
from bdvae.model import build_model
from bdvae.steps import make_optimizer, place, step_on_device
from bdvae.training import EVAL_BATCH, evaluate_terms, resume, train, train_epoch
from conftest import assert_rows_close, interrupted_copy, run_rows


def _config(mnist_dir, step: str, **train_options) -> Config:
    """2 epochs of 8 steps on 512 real images, a training state every 3 steps."""
    return Config(data=DataConfig(data_dir=str(mnist_dir), train_size=512, test_size=64),
                  train=TrainConfig(epochs=2, batch_size=64, checkpoint_every=3, threads=1, step=step, **train_options))


def _train(config: Config, out, logs: list[str] | None = None):
    return train(config, out, progress=False, log=(logs.append if logs is not None else lambda _: None))


def _same_weights(run_dir, other) -> bool:
    ours, theirs = load_file(str(run_dir / rundir.WEIGHTS_FILE)), load_file(str(other / rundir.WEIGHTS_FILE))
    return ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def host_and_device(mnist_dir, tmp_path_factory):
    """The same short training with the step on the host and on the device."""
    root = tmp_path_factory.mktemp("steps")
    return _train(_config(mnist_dir, "host"), root / "host"), _train(_config(mnist_dir, "device"), root / "device")


def test_auto_captures_the_step_on_a_gpu_and_leaves_it_on_the_host_of_a_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    steps = ("auto", "host", "device", "graph")
    assert [place(TrainConfig(step=s), cpu) for s in steps] == ["host", "host", "device", "graph"]
    assert [place(TrainConfig(step=s), gpu) for s in steps] == ["graph", "host", "device", "graph"]
    assert [step_on_device(TrainConfig(step=s), gpu) for s in steps] == [True, False, True, True]


def test_where_a_cuda_graph_cannot_be_captured_the_device_step_runs_eagerly(mnist_dir, host_and_device, tmp_path):
    # On a CPU: the same run as the eager device step, bit for bit, and run.json says why.
    _, device = host_and_device
    graph = _train(_config(mnist_dir, "graph"), tmp_path / "graph")
    assert rundir.read_run_facts(graph)["step"] == "device, eager (CUDA graphs need a CUDA device)"
    assert _same_weights(graph, device)


def test_on_a_cpu_the_device_step_trains_the_host_steps_model(host_and_device):
    # The same draws (on a CPU the device's generator is the host's); fused Adam rounds otherwise.
    host, device = host_and_device
    assert_rows_close(run_rows(device), run_rows(host), rel=5e-3)
    assert rundir.read_run_facts(device)["step"] == "device, eager" and rundir.read_run_facts(host)["step"] == "host"


def _count_host_reads(monkeypatch) -> dict[str, int]:
    """Count the tensor methods that bring a value to the host (and on a GPU wait for it)."""
    counts = {"n": 0}
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            counts["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


@pytest.mark.parametrize("step", ["host", "device"])
def test_the_device_step_reads_nothing_back_between_progress_points(step, monkeypatch):
    # On a GPU each read waits for the device; on a CPU the same calls are counted.
    config = Config(train=TrainConfig(batch_size=8, step=step, checkpoint_every=0, mixed_precision=False))
    images = torch.randint(0, 256, (8 * 40, 1, 32, 32), dtype=torch.uint8)  # 40 steps: one progress point (25)
    torch.manual_seed(0)
    model = build_model(config.model, config.objective, (1, 32, 32))
    optimizer = make_optimizer(model, config.train, step_on_device(config.train, torch.device("cpu")))
    counts = _count_host_reads(monkeypatch)
    with tqdm(total=len(images), disable=True) as bar:
        means = train_epoch(model, optimizer, images, config, bar, states.Position(), torch.Generator().manual_seed(0),
                            ctx=Context())
    monkeypatch.undo()
    assert means["skipped_batches"] == 0 and means["loss"] == means["loss"]
    if step == "device":  # the progress point, the epoch's end and its means
        assert counts["n"] <= 6, counts
    else:  # the loss and the gradient norm, every step
        assert counts["n"] >= 2 * 40, counts


def test_the_test_pass_reads_its_sums_back_once(monkeypatch):
    # Each chunk's sums stay where the model runs; the pass ends with one read of all five.
    config = Config(train=TrainConfig(mixed_precision=False))
    images = torch.randint(0, 256, (3 * EVAL_BATCH, 1, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    model = build_model(config.model, config.objective, (1, 32, 32))
    counts = _count_host_reads(monkeypatch)
    terms = evaluate_terms(model, images, config, seed=0)
    monkeypatch.undo()
    assert counts["n"] == 1, counts
    assert terms["loss"] == pytest.approx(terms["recon_nll"] + terms["reg"]) and terms["kl"] > 0


def test_the_device_step_resumes_bit_for_bit(mnist_dir, host_and_device, tmp_path):
    _, whole = host_and_device
    cut = interrupted_copy(whole, tmp_path / "cut")
    logs: list[str] = []
    resume(cut, progress=False, log=logs.append)
    assert "resuming at epoch 2, image 448 of 512, after 15 steps" in logs
    assert _same_weights(cut, whole)
    assert run_rows(cut) == [{**r, "seconds": c["seconds"]} for r, c in zip(run_rows(whole), run_rows(cut))]


def test_a_host_steps_training_state_goes_on_in_the_device_step(host_and_device, tmp_path):
    # As a run started on a CPU and resumed on a GPU (train.step = "auto"): Adam becomes fused.
    host, device = host_and_device
    cut = interrupted_copy(host, tmp_path / "cut")
    config = rundir.read_config(cut)
    rundir.write_config(cut, dataclasses.replace(config, train=dataclasses.replace(config.train, step="device")))
    logs: list[str] = []
    resume(cut, progress=False, log=logs.append)
    assert any("the step on the device" in line for line in logs)
    assert rundir.read_run_facts(cut)["step"] == "device, eager"
    assert_rows_close(run_rows(cut), run_rows(host), rel=5e-3)


def test_a_state_drawn_on_another_device_goes_on_with_a_new_stream(host_and_device, tmp_path):
    # A GPU's generator state (16 bytes of Philox seed and offset) cannot seed the CPU's.
    _, device = host_and_device
    cut = interrupted_copy(device, tmp_path / "cut")
    newest = rundir.state_paths(cut)[-1]
    tensors, state = states.load(newest)
    tensors[states.GENERATOR_KEY] = torch.zeros(16, dtype=torch.uint8)
    states.save_sealed(newest, tensors, {**state, "generator_device": "cuda"})
    logs: list[str] = []
    resume(cut, progress=False, log=logs.append)
    assert any("a generator on the cuda, this run's are on the cpu: a new stream" in line for line in logs)
    rows = run_rows(cut)
    assert rows[0] == {**run_rows(device)[0], "seconds": rows[0]["seconds"]}  # epoch 1 was done before
    assert len(rows) == 2 and rows[1]["test_loss"] == pytest.approx(run_rows(device)[1]["test_loss"], rel=0.05)
