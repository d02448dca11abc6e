"""The CUDA paths against the CPU: training, bf16 autocast, checkpoints moving between devices,
the IWAE, compare --jobs and NCCL. Skipped without a CUDA GPU (CI has none); on a GPU machine:

    python -m pytest tests/test_cuda.py -v

BDVAE_TEST_DEVICE=cpu runs the same tests with the CPU standing in for the GPU: it checks the
tests themselves (every comparison is then the CPU against itself), not CUDA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_rows_close, interrupted_copy, run_cli, run_files, run_rows

DEVICE = os.environ.get("BDVAE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 and 2 epochs of 8 steps, a training state every 3 steps (as in test_distributed.py).
SMALL = ["--set", "data.train_size=512", "--set", "data.test_size=256", "--set", "train.epochs=2",
         "--set", "train.checkpoint_every=3", "--set", "train.batch_size=64", "--quiet"]
FP32 = ["--set", "train.mixed_precision=false"]
HOST = ["--set", "train.step='host'"]  # the CPU's draws: the same run as on the CPU, to the device's float sums
ON_DEVICE = ["--set", "train.step='device'"]  # a GPU's default: the draws come from the device's own generator
DRAWS_APART = 0.1  # the test loss of two such runs whose draws differ (6% apart at most on a CPU, 3 streams)


@pytest.fixture
def exact_fp32(monkeypatch):
    """No TF32 in this process's CUDA matmuls and convolutions (on by default for cuDNN
    convolutions on Ampere and later): the comparisons below are of fp32 against fp32."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    yield
    torch.set_float32_matmul_precision(matmul)


def _train(mnist_dir: Path, out: Path, device: str, *extra: str) -> Path:
    # NVIDIA_TF32_OVERRIDE=0: no TF32 in the training process either, so that fp32 means fp32.
    result = run_cli("train", "--data-dir", str(mnist_dir), "--out", str(out), "--device", device, *SMALL, *extra,
                     env={"NVIDIA_TF32_OVERRIDE": "0"})
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def cpu_run(mnist_dir, tmp_path_factory) -> Path:
    return _train(mnist_dir, tmp_path_factory.mktemp("cpu") / "run", "cpu", *FP32)


@pytest.fixture(scope="module")
def device_run(mnist_dir, tmp_path_factory) -> Path:
    return _train(mnist_dir, tmp_path_factory.mktemp("device") / "run", DEVICE, *FP32, *HOST)


@pytest.fixture(scope="module")
def device_step_run(mnist_dir, tmp_path_factory) -> Path:
    return _train(mnist_dir, tmp_path_factory.mktemp("device-step") / "run", DEVICE, *FP32, *ON_DEVICE)


def test_a_step_on_the_device_leaves_the_cpus_gradient(exact_fp32):
    from bdvae.config import Config
    from bdvae.distributed import Context
    from bdvae.model import build_model
    from bdvae.objective import Objective
    from bdvae.steps import backward_shard

    def step(device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        config = Config()
        torch.manual_seed(0)
        model = build_model(config.model, config.objective, (1, 32, 32)).to(device)
        gen = torch.Generator().manual_seed(1)
        x, eps = torch.rand(64, 1, 32, 32, generator=gen), torch.randn(64, 16, generator=gen)
        sums = backward_shard(Objective(model, config.objective), x, eps, 64, 1.0, Context(device=torch.device(device)))
        return {name: p.grad.cpu() for name, p in model.named_parameters()}, sums.cpu()

    (grads, sums), (ref_grads, ref_sums) = step(DEVICE), step("cpu")
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-3)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item(), msg=name)


def test_training_on_the_device_is_the_cpu_run(device_run, cpu_run):
    assert run_files(device_run) == run_files(cpu_run)  # the same outputs and training states
    facts = json.loads((device_run / "run.json").read_text())
    assert facts["device"] == DEVICE and facts["precision"] == "fp32"
    # 16 Adam steps apart by the GPU's float sums (and TF32 convolutions, torch's default there).
    assert_rows_close(run_rows(device_run), run_rows(cpu_run), rel=1e-2)


def test_the_device_step_trains_like_the_cpu(device_step_run, cpu_run):
    assert run_files(device_step_run) == run_files(cpu_run)
    facts = json.loads((device_step_run / "run.json").read_text())
    assert facts["device"] == DEVICE and facts["step"] == "device, eager"
    rows, ref_rows = run_rows(device_step_run), run_rows(cpu_run)
    assert rows[1]["test_loss"] < rows[0]["test_loss"]
    assert rows[1]["test_loss"] == pytest.approx(ref_rows[1]["test_loss"], rel=DRAWS_APART)


def test_the_device_step_resumes_on_the_device(device_step_run, tmp_path):
    # Bit for bit where the device's kernels are deterministic; cuDNN's convolution gradients may
    # sum in another order from run to run, hence 1e-4: another generator state would be % apart.
    run_dir = interrupted_copy(device_step_run, tmp_path / "run")
    result = run_cli("train", "--resume", str(run_dir), "--device", DEVICE, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch 2, image 448 of 512, after 15 steps" in result.stdout
    assert "a new stream" not in result.stdout
    assert_rows_close(run_rows(run_dir), run_rows(device_step_run), rel=1e-4)


CAPTURED = {  # what a run's facts say of its step under train.step = "graph"
    "cuda": "device, CUDA graph", "cpu": "device, eager (CUDA graphs need a CUDA device)"}


@pytest.mark.parametrize("what", ["reference", "quality", "mmd", "aggregate-bd"])
def test_the_captured_step_is_the_eager_one(mnist_dir, device_step_run, what, tmp_path):
    """The same draws (taken outside the graph) through the replayed update: the eager device
    step's run to float rounding, for BatchNorm and a cosine schedule (quality) and a term with
    prior draws (mmd); the aggregate BD term's Cholesky checks on the host, so it runs eagerly."""
    extra = {"reference": [], "quality": ["--preset", "quality", "--set", "objective.warmup_steps=8"],
             "mmd": ["--set", "objective.aggregate='mmd'", "--set", "objective.aggregate_weight=50"],
             "aggregate-bd": ["--set", "objective.aggregate='bhattacharyya'"]}[what]
    graph = _train(mnist_dir, tmp_path / "graph", DEVICE, *FP32, "--set", "train.step='graph'", *extra)
    eager = device_step_run if what == "reference" else _train(mnist_dir, tmp_path / "eager", DEVICE, *FP32, *ON_DEVICE,
                                                               *extra)
    step = json.loads((graph / "run.json").read_text())["step"]
    if what == "aggregate-bd" and DEVICE == "cuda":
        assert step == "device, eager (objective.aggregate = 'bhattacharyya' checks its linear algebra on the host)"
    else:
        assert step == CAPTURED[DEVICE]
    assert_rows_close(run_rows(graph), run_rows(eager), rel=1e-4)


def test_a_step_that_waits_for_the_host_is_not_captured(mnist_dir, tmp_path, monkeypatch):
    """Found in the last warm-up step (CUDA's sync debug mode), before it could break a capture."""
    from test_resume import _small_config

    from bdvae import objective
    from bdvae.training import train

    real = objective.loss_sums

    def waiting(*args, **kwargs):
        sums = real(*args, **kwargs)
        sums[0].item()  # a host read, as a check on the loss's value would make
        return sums

    monkeypatch.setattr(objective, "loss_sums", waiting)
    logs: list[str] = []
    run_dir = train(_small_config(mnist_dir, step="graph"), tmp_path / "run", progress=False, device=DEVICE,
                    log=logs.append)
    step = json.loads((run_dir / "run.json").read_text())["step"]
    if DEVICE == "cuda":
        assert step.startswith("device, eager (the step waits for the host (")
        assert any("the training step runs eagerly: the step waits for the host" in line for line in logs)
    else:
        assert step == CAPTURED["cpu"]
    assert len(run_rows(run_dir)) == 2


def test_auto_captures_the_step_on_a_gpu(mnist_dir, device_step_run, tmp_path):
    run_dir = _train(mnist_dir, tmp_path / "run", DEVICE, *FP32)
    expected = CAPTURED["cuda"] if DEVICE == "cuda" else "host"
    assert json.loads((run_dir / "run.json").read_text())["step"] == expected


@pytest.mark.parametrize("skip", [False, True])
def test_a_nan_in_the_device_step(mnist_dir, tmp_path, monkeypatch, skip):
    from test_resume import _faulty_loss_terms, _small_config

    import bdvae
    from bdvae.errors import BdvaeError

    _faulty_loss_terms(monkeypatch, bad_step=3 if skip else 12)
    config = _small_config(mnist_dir, step="device", skip_nonfinite=skip)
    if skip:
        run_dir = bdvae.train(config, tmp_path / "skip", progress=False, device=DEVICE)
        assert [r["skipped_batches"] for r in run_rows(run_dir)] == [1, 0]
        return
    with pytest.raises(BdvaeError, match=r"^step 12: non-finite loss or gradient \(loss=nan, recon_nll=nan.*"
                                         r"the last good checkpoint .*step-000000010\.safetensors is kept"):
        bdvae.train(config, tmp_path / "nan", progress=False, device=DEVICE)


def test_bf16_autocast_where_the_device_computes_it_faster(mnist_dir, cpu_run, tmp_path):
    from bdvae.devices import fast_bf16

    run_dir = _train(mnist_dir, tmp_path / "run", DEVICE, *HOST)  # train.mixed_precision defaults to true
    fast = fast_bf16(torch.device(DEVICE))
    assert json.loads((run_dir / "run.json").read_text())["precision"] == ("bf16 autocast" if fast else "fp32")
    assert_rows_close(run_rows(run_dir), run_rows(cpu_run), rel=3e-2)  # as 2 CPU processes in bf16: 2e-2


@pytest.mark.parametrize("aggregate", ["bhattacharyya", "mmd"])
def test_an_aggregate_term_on_the_device_is_the_cpus(mnist_dir, aggregate, tmp_path):
    """The aggregate terms' float64 linear algebra (Cholesky, eigenvalues) and kernels on the device:
    the same run as on the CPU, within the device's float sums."""
    term = ["--set", f"objective.aggregate='{aggregate}'", "--set", "objective.aggregate_weight=50", *FP32]
    on_device = run_rows(_train(mnist_dir, tmp_path / "device", DEVICE, *term, *HOST))
    on_cpu = run_rows(_train(mnist_dir, tmp_path / "cpu", "cpu", *term))
    assert all(row["test_aggregate"] > 0 for row in on_device)
    assert_rows_close(on_device, on_cpu, rel=1e-2)


@pytest.mark.parametrize("direction", ["device-to-cpu", "cpu-to-device", "device-step-to-cpu"])
def test_a_training_state_resumes_on_the_other_device(direction, device_run, device_step_run, cpu_run, tmp_path):
    started, other = {"device-to-cpu": (device_run, "cpu"), "cpu-to-device": (cpu_run, DEVICE),
                      "device-step-to-cpu": (device_step_run, "cpu")}[direction]
    run_dir = interrupted_copy(started, tmp_path / "run")
    result = run_cli("train", "--resume", str(run_dir), "--device", other, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming at epoch 2, image 448 of 512, after 15 steps" in result.stdout
    rows, ref_rows = run_rows(run_dir), run_rows(started)
    assert rows[0] == ref_rows[0]  # epoch 1 comes from the checkpoint
    # The last step on the other device; with the GPU's own draws it goes on with a new stream.
    new_stream = direction == "device-step-to-cpu" and DEVICE != "cpu"
    assert ("a new stream" in result.stdout) == new_stream
    assert_rows_close(rows[1:], ref_rows[1:], rel=DRAWS_APART if new_stream else 1e-2)
    assert json.loads((run_dir / "run.json").read_text())["device"] == other
    assert run_files(run_dir) == run_files(started)


def test_the_iwae_on_the_device_is_the_cpus(device_run, exact_fp32):
    from bdvae.api import load_run
    from bdvae.data import load_dataset
    from bdvae.evaluation import EvalOptions, iwae_nll
    from bdvae.likelihoods import to_float

    run = load_run(device_run)
    x = to_float(load_dataset(run.config.data, log=lambda _: None).test_images[:40])
    options = EvalOptions(k=50, max_batch=500, dtype="fp32")
    on_device, on_cpu = (iwae_nll(run, x, options, torch.Generator().manual_seed(0), False, torch.device(d))
                         for d in (DEVICE, "cpu"))  # the same draws: the noise comes from the CPU generator
    assert on_device.device.type == "cpu" and on_device.shape == (40,)
    torch.testing.assert_close(on_device, on_cpu, rtol=0, atol=1e-2)
    assert next(run.model.parameters()).device.type == "cpu"  # the GPU got a copy


def test_evaluate_on_the_device(device_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(device_run, run_dir)
    result = run_cli("evaluate", str(run_dir), "-k", "4", "--samples", "300", "--test-size", "300",
                     "--device", DEVICE, "--samplers", "gmm-3", "--quiet")
    assert result.returncode == 0, result.stderr
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["iwae_nll"]["device"] == DEVICE and f"on {DEVICE} (nats)" in result.stdout
    assert list(m["samplers"]) == ["prior", "gmm-3"]  # fitted and scored on the CPU beside the device's IWAE
    assert m["neg_elbo"]["mean"] - 15 < m["iwae_nll"]["mean"] < m["neg_elbo"]["mean"]


def test_compare_jobs_on_the_device(mnist_dir, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli("compare", "--regularizers", "bhattacharyya,kl", "--seeds", "1", "--epochs", "1", "--jobs", "2",
                     "--device", DEVICE, "--out", str(out), "--data-dir", str(mnist_dir), "--set", "data.train_size=512",
                     "--set", "train.batch_size=64", "-k", "2", "--samples", "300", "--test-size", "300", "--quiet")
    assert result.returncode == 0, result.stderr
    gpus = min(2, torch.cuda.device_count()) if DEVICE == "cuda" else 0
    plan = next(line for line in result.stdout.splitlines() if line.startswith("2 runs, 2 at a time"))
    assert plan.endswith(f", on {gpus} GPUs") if gpus else "GPU" not in plan
    # Each job's training names the device it got: with 2 GPUs, one each.
    used = set(re.findall(r" parameters; (cpu|cuda:\d+)", result.stdout))
    assert used == ({f"cuda:{i}" for i in range(gpus)} if gpus else {"cpu"}), result.stdout
    for name in ("bhattacharyya-beta1-seed0", "kl-beta1-seed0"):
        assert json.loads((out / "runs" / name / "run.json").read_text())["device"] == DEVICE
        assert json.loads((out / "runs" / name / "metrics.json").read_text())["iwae_nll"]["device"] == DEVICE


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
def test_two_gpus_over_nccl_train_the_run_of_one(mnist_dir, device_run, tmp_path):
    run_dir = _train(mnist_dir, tmp_path / "run", "cuda", *FP32, *HOST, "--nproc", "2", "--set", "train.batch_size=32")
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["processes"] == 2 and facts["device"] == "cuda"
    assert run_files(run_dir) == run_files(device_run)
    assert_rows_close(run_rows(run_dir), run_rows(device_run), rel=1e-2)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
def test_two_gpus_with_the_step_on_them_train_the_run_of_one(mnist_dir, device_step_run, tmp_path):
    # Each rank's generator on its GPU, seeded alike: the same draws as one GPU's; eager, not captured.
    run_dir = _train(mnist_dir, tmp_path / "run", "cuda", *FP32, "--nproc", "2", "--set", "train.batch_size=32")
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["step"] == "device, eager (CUDA graphs are not used with several processes)"
    assert_rows_close(run_rows(run_dir), run_rows(device_step_run), rel=1e-2)


def test_an_iwae_larger_than_the_device_is_refused(device_run):
    """The IWAE's memory (its decode batch and running sums) is checked against what the device has
    free before anything is allocated there."""
    result = run_cli("evaluate", str(device_run), "--device", DEVICE, "-k", str(10**15))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "the IWAE with k=1,000,000,000,000,000 and a decode batch of " in result.stderr
    where = "free on the GPU" if DEVICE == "cuda" else "available to this process"
    assert f"is {where}: use a smaller -k or --max-batch" in result.stderr
