"""Data-parallel training: real torch.distributed (gloo) processes on 127.0.0.1, launched by
torch.multiprocessing and by torchrun, against single-process training."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from bdvae.api import load_run
from bdvae.data import load_dataset
from bdvae.training import evaluate_terms
from conftest import assert_rows_close, interrupted_copy, run_cli, run_files, run_rows


@given(n=st.integers(0, 300), world_size=st.integers(1, 9))
def test_shards_tile_the_global_batch_in_rank_order_and_differ_by_at_most_one(n, world_size):
    from bdvae.distributed import shard

    parts = [shard(n, r, world_size) for r in range(world_size)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(g: int):
    """A global batch of g images in [0, 1], its noise and N(0, I) draws, the same in every process (float64)."""
    gen = torch.Generator().manual_seed(1234)
    return (torch.rand(g, 1, 32, 32, generator=gen).double(), torch.randn(g, 16, generator=gen).double(),
            torch.randn(g, 16, generator=gen).double())


def _gradients(ctx, g: int, beta: float, aggregate: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference model's parameter gradients and loss sums after backward_shard on this rank's
    shard of a global batch of g images, with the aggregate term `aggregate` (weight 50) if given.
    In float64, so that what is compared is the sharding, scaling and averaging, not the order
    of float32 sums."""
    from bdvae import distributed
    from bdvae.config import Config, ObjectiveConfig
    from bdvae.model import build_model
    from bdvae.objective import Objective
    from bdvae.steps import backward_shard

    config = Config(objective=ObjectiveConfig(aggregate=aggregate, aggregate_weight=50.0))
    torch.manual_seed(0)
    model = build_model(config.model, config.objective, (1, 32, 32)).double()
    loss = distributed.wrap(Objective(model, config.objective, ctx.gather_rows), ctx)
    x, eps, prior = _batch(g)
    part = distributed.shard(g, ctx.rank, ctx.world_size)
    sums = backward_shard(loss, x[part], eps[part], g, beta, ctx, prior=prior if aggregate == "mmd" else None)
    return {name: p.grad.clone() for name, p in model.named_parameters()}, sums


def _rank_main(rank: int, world_size: int, port: int, g: int, out: str, aggregate: str | None) -> None:
    from bdvae.distributed import Context

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        grads, sums = _gradients(Context(rank=rank, world_size=world_size), g, beta=2.0, aggregate=aggregate)
        torch.save({"grads": grads, "sums": sums}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("aggregate", [None, "bhattacharyya", "mmd"], ids=["per-image", "aggregate-bd", "aggregate-mmd"])
@pytest.mark.parametrize("g", [64, 7], ids=["even-shards", "uneven-shards"])
@pytest.mark.slow
def test_gradient_averaged_over_two_ranks_equals_the_single_process_gradient(g, aggregate, tmp_path):
    """With an aggregate term too: its batch is gathered over the ranks, so it is the single
    process's term, and its gradient reaches every rank's images."""
    from bdvae.distributed import Context

    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), g, str(tmp_path), aggregate), nprocs=2, join=True)
    single, single_sums = _gradients(Context(), g, beta=2.0, aggregate=aggregate)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        torch.testing.assert_close(rank["sums"], single_sums, rtol=1e-6, atol=1e-6)  # all-reduced sums
        assert rank["grads"].keys() == single.keys()
        for name, grad in single.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
    for name in single:  # DDP leaves the same averaged gradient on both ranks
        assert ranks[0]["grads"][name].equal(ranks[1]["grads"][name])


# fp32: these tests compare how the arithmetic is split over processes, and bf16 rounding (the
# default on CPUs with native bf16) depends on the shapes of the batches.
SMALL = ["--set", "data.train_size=512", "--set", "data.test_size=256", "--set", "train.epochs=2",
         "--set", "train.checkpoint_every=3", "--set", "train.mixed_precision=false", "--quiet"]


@pytest.fixture(scope="module")
def single(mnist_dir, tmp_path_factory) -> Path:
    """One process with batch 64: the same global batch as 2 processes of 32."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = run_cli("train", "--data-dir", str(mnist_dir), "--out", str(out), *SMALL,
                     "--set", "train.batch_size=64", "--set", "train.threads=1")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def two_processes(mnist_dir, tmp_path_factory) -> Path:
    """torchrun with 2 gloo processes and a c10d rendezvous on 127.0.0.1, as docs/scaling-out.md runs it."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "bdvae", "train",
           "--data-dir", str(mnist_dir), "--out", str(out), *SMALL, "--set", "train.batch_size=32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("run directory: ") == 1  # rank 0 alone reports (and writes)
    assert "2 processes, global batch 64" in result.stdout
    assert "Warning" not in result.stderr, result.stderr  # e.g. DDP's grad strides against its buckets
    return out


@pytest.mark.slow
def test_two_processes_write_the_same_files_and_metrics_as_one_with_the_same_global_batch(single, two_processes):
    assert run_files(two_processes) == run_files(single)  # the same outputs and checkpoints (same steps)
    assert_rows_close(run_rows(two_processes), run_rows(single))
    assert json.loads((two_processes / "run.json").read_text())["processes"] == 2
    ours, theirs = load_file(str(two_processes / "model.safetensors")), load_file(str(single / "model.safetensors"))
    for name in theirs:  # 16 Adam steps apart only by the order of float sums
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-2)


@pytest.mark.slow
def test_two_torchrun_agents_as_two_machines_meet_over_loopback(single, mnist_dir, tmp_path):
    """The several-machines command of docs/scaling-out.md, with both "machines" on 127.0.0.1: a real c10d
    rendezvous of 2 agents, one process each."""
    out, port = tmp_path / "run", _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", "-m", "bdvae", "train",
           "--data-dir", str(mnist_dir), "--out", str(out), *SMALL, "--set", "train.batch_size=32"]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(stdout.count("run directory: ") for stdout, _ in outputs) == 1
    assert run_files(out) == run_files(single)
    assert_rows_close(run_rows(out), run_rows(single))


@pytest.mark.slow
def test_two_processes_in_bf16_train_the_run_of_one_up_to_bf16_rounding(mnist_dir, tmp_path):
    """The default arithmetic on CPUs with native bf16 (elsewhere both runs are fp32) runs under
    DDP; bf16 rounds differently for batches of 32 and 64 (0.7% apart at most here). The exact
    sharding and scaling are checked in float64 above."""
    bf16 = [arg if arg != "train.mixed_precision=false" else "train.mixed_precision=true" for arg in SMALL]
    common = ["train", "--data-dir", str(mnist_dir), *bf16, "--set", "train.threads=1"]
    one = run_cli(*common, "--out", str(tmp_path / "one"), "--set", "train.batch_size=64")
    two = run_cli(*common, "--out", str(tmp_path / "two"), "--set", "train.batch_size=32", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert run_files(tmp_path / "two") == run_files(tmp_path / "one")
    assert_rows_close(run_rows(tmp_path / "two"), run_rows(tmp_path / "one"), rel=2e-2)


@pytest.mark.slow
def test_two_processes_with_the_step_on_the_device_train_the_run_of_one(mnist_dir, single, tmp_path):
    """train.step = "device" (a GPU's default) under DDP: the loss sums all-reduced on the device,
    the deferred checks alike on every rank; on a CPU its draws are the host step's."""
    common = ["train", "--data-dir", str(mnist_dir), *SMALL, "--set", "train.threads=1", "--set", "train.step='device'"]
    two = run_cli(*common, "--out", str(tmp_path / "two"), "--set", "train.batch_size=32", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "run.json").read_text())["step"] == "device, eager"
    assert run_files(tmp_path / "two") == run_files(single)
    assert_rows_close(run_rows(tmp_path / "two"), run_rows(single), rel=5e-3)  # fused Adam rounds otherwise


@pytest.mark.parametrize("resume_with", [1, 2])
@pytest.mark.slow
def test_a_checkpoint_resumes_with_another_number_of_processes(resume_with, single, two_processes, tmp_path):
    started = two_processes if resume_with == 1 else single
    run_dir = interrupted_copy(started, tmp_path / "run")
    result = run_cli("train", "--resume", str(run_dir), "--nproc", str(resume_with), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("run directory: ") == 1 and "resuming at epoch 2" in result.stdout
    rows, ref_rows = run_rows(run_dir), run_rows(started)
    assert rows[0] == ref_rows[0]  # epoch 1 comes from the checkpoint
    assert json.loads((run_dir / "run.json").read_text())["processes"] == resume_with
    # The rest of epoch 2 ran with another global batch: close, but not the same run.
    assert rows[1]["test_loss"] == pytest.approx(ref_rows[1]["test_loss"], rel=0.05)
    outputs = [name for name in run_files(run_dir) if not name.startswith("checkpoints/")]
    assert outputs == [name for name in run_files(started) if not name.startswith("checkpoints/")]


@pytest.mark.slow
def test_nproc_errors_are_one_line_and_start_nothing(tmp_path):
    result = run_cli("train", "--nproc", "0", "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr == "bdvae: error: --nproc must be between 1 and 1024, got 0\n"
    result = run_cli("train", "--nproc", "2", "--set", "data.name=npz", "--set", f"data.path={tmp_path}/missing.npz",
                     "--out", str(tmp_path / "b"), "--quiet")
    assert result.returncode == 2  # every worker fails; the launcher reports their message once
    assert result.stderr.startswith("bdvae: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "missing.npz: not a readable" in result.stderr
    assert not (tmp_path / "b").exists()
    result = run_cli("train", "--device", "tpu", "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')" in result.stderr
    result = run_cli("train", "--resume", str(tmp_path / "nothing"), "--nproc", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nothing to resume" in result.stderr


def test_a_worker_error_goes_to_torchruns_error_file_or_to_stderr_with_its_rank(tmp_path, monkeypatch, capsys):
    from bdvae.distributed import LAUNCHED, report_error

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report_error("data missing")  # under torchrun by hand: every rank says it, with its rank
    assert capsys.readouterr().err == "bdvae: error: rank 1: data missing\n"
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv(LAUNCHED, "1")
    report_error("data missing")  # under `bdvae train --nproc`: the launcher prints it, once
    assert capsys.readouterr().err == ""
    data = json.loads(error_file.read_text())
    assert data["message"] == "data missing" and data["bdvae"] is True and data["timestamp"] > 0


def test_the_group_is_left_after_a_normal_end_only(monkeypatch):
    """joined() tears down after the block, also on a return from inside it, and not after an
    error: then the other ranks may still be in a collective, and torchrun stops them."""
    from bdvae import distributed

    left = []
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Context())
    monkeypatch.setattr(distributed, "teardown", lambda ctx: left.append(ctx))

    def returns_inside() -> int:
        with distributed.joined("cpu"):
            return 7

    assert returns_inside() == 7 and len(left) == 1
    with pytest.raises(ValueError, match="bad data"):
        with distributed.joined("cpu"):
            raise ValueError("bad data")
    assert len(left) == 1


@pytest.mark.slow
def test_two_processes_evaluate_a_batchnorm_model_with_the_saved_statistics(mnist_dir, tmp_path):
    """Each rank's last training step moves its own BatchNorm running statistics; the test pass
    (2,000 images: each rank scores 1,000) must use rank 0's, the ones saved, on every rank."""
    out = tmp_path / "run"
    result = run_cli("train", "--data-dir", str(mnist_dir), "--out", str(out), "--preset", "quality", "--quiet",
                     "--set", "data.train_size=256", "--set", "data.test_size=2000", "--set", "train.epochs=1",
                     "--set", "train.batch_size=32", "--set", "train.mixed_precision=false",
                     "--set", "train.threads=1", "--nproc", "2")
    assert result.returncode == 0, result.stderr
    run = load_run(out)
    data = load_dataset(run.config.data, log=lambda _: None)
    again = evaluate_terms(run.model, data.test_images, run.config, seed=run.config.train.seed)
    row = run_rows(out)[-1]
    for name in ("recon_nll", "kl", "bhattacharyya"):
        assert row[f"test_{name}"] == pytest.approx(again[name], rel=1e-5), name
