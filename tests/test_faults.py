"""Faults injected into real runs and real command lines: each ends in one line on stderr and exit
code 2, and leaves every earlier file as it was (sha256 before and after)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bdvae
from bdvae import files, rundir
from bdvae.config import Config, DataConfig, TrainConfig
from bdvae.errors import BdvaeError

from conftest import run_cli, tiny_npz


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A small finished run (random 28x28 images), trained once for the module."""
    folder = tmp_path_factory.mktemp("faults")
    data = tiny_npz(folder / "tiny.npz", train=64, test=32, seed=2)
    config = Config(data=DataConfig(name="npz", path=str(data)), train=TrainConfig(epochs=1, batch_size=32))
    return bdvae.train(config, folder / "run", progress=False)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bdvae: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


COMMANDS = [
    lambda run, out: ["sample", str(run), "-n", "4", "--out", str(out / "s.png")],
    lambda run, out: ["reconstruct", str(run), "-n", "4", "--out", str(out / "r.png")],
    lambda run, out: ["evaluate", str(run), "-k", "2", "--samples", "32", "--no-pictures"],
    lambda run, out: ["sampler", "fit", str(run), "gmm", "--components", "2"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=["sample", "reconstruct", "evaluate", "sampler-fit"])
def test_weights_changed_since_training_are_refused_by_every_command_that_loads_them(finished, command, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = run / rundir.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight: the file still loads, the model is another
    weights.write_bytes(bytes(data))
    before = _digests(run)
    _one_line(run_cli(*command(run, tmp_path)), f"{weights}: its sha256 is not the one run.json recorded")
    assert _digests(run) == before and not list(tmp_path.glob("*.png"))


def test_weights_holding_nan_are_refused(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = run / rundir.WEIGHTS_FILE
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights))
    facts = json.loads((run / rundir.RUN_FILE).read_text())
    facts[rundir.WEIGHTS_SHA256] = rundir.weights_digest(run)  # as a diverged training would have written it
    (run / rundir.RUN_FILE).write_text(json.dumps(facts))
    before = _digests(run)
    for command in COMMANDS:
        _one_line(run_cli(*command(run, tmp_path)), f"{weights}: {name} holds NaN or infinite values")
    assert _digests(run) == before


def test_a_run_written_before_the_checksum_loads_with_a_note(finished, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    facts = json.loads((run / rundir.RUN_FILE).read_text())
    del facts[rundir.WEIGHTS_SHA256]
    (run / rundir.RUN_FILE).write_text(json.dumps(facts))
    with caplog.at_level("INFO", logger="bdvae"):
        loaded = bdvae.load_run(run)
    assert loaded.sample(2).shape == (2, 1, 32, 32)
    assert f"{run / rundir.WEIGHTS_FILE}: written before bdvae recorded its sha256, so it is loaded unchecked" in caplog.messages


@pytest.mark.parametrize("args,message", [
    (["--set", "train.epochs=" + "[" * 500 + "]" * 500], "--set train.epochs: nested more than 8 levels deep"),
    (["--set", "model.widths=" + "[" * 10 + "]" * 10], "--set model.widths: nested more than 8 levels deep"),
    (["--set", "data.path=" + '"' + "x" * 5000 + '"'], "--set data.path: 5,012 characters; at most 4,196"),
    (["--set", "data.path=" + '"' + "x" * 4100 + '"'], "--set data.path: a string of 4,100 characters; at most 4,096"),
    (["--set", "model.widths=[" + ",".join(["8"] * 2000) + "]"], "--set model.widths: 2,000 entries; at most 1,024"),
])
def test_absurd_configuration_values_are_one_line(args, message, tmp_path):
    result = run_cli("train", "--out", str(tmp_path / "run"), *args)
    _one_line(result, message)
    assert not (tmp_path / "run").exists()


def test_an_absurdly_deep_config_file_is_one_line(tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text("[train]\nepochs = " + "[" * 500 + "]" * 500 + "\n")
    result = run_cli("train", "--config", str(config), "--out", str(tmp_path / "run"))
    _one_line(result, f"config {config}: nested more than 8 levels deep")
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_stops_in_one_line_and_keeps_its_last_good_checkpoint(finished, tmp_path):
    config = rundir.read_config(finished)
    result = run_cli("train", "--out", str(tmp_path / "run"), "--set", "data.name=npz", "--set", f"data.path={config.data.path}",
                     "--set", "train.batch_size=16", "--set", "train.lr=1e30", "--set", "train.skip_nonfinite=true",
                     "--set", "train.checkpoint_every=2", "--quiet")
    _one_line(result, "epoch 1: the run diverged: ", "batches had a non-finite loss or gradient, more than "
              "train.max_skipped_share = 0.5", "the last good checkpoint")
    kept = rundir.state_paths(tmp_path / "run")
    assert kept and str(kept[-1]) in result.stderr
    assert not (tmp_path / "run" / rundir.RUN_FILE).exists() and not (tmp_path / "run" / rundir.WEIGHTS_FILE).exists()
    assert not (tmp_path / "run" / rundir.METRICS_LOG).exists()  # no row of a diverged epoch


def _strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_files_stay_strict_json_with_non_finite_values_named(tmp_path):
    rundir.write_metrics_log(tmp_path, [{"epoch": 1, "test_loss": float("nan"), "train_loss": 3.5},
                                        {"epoch": 2, "test_loss": 2.0, "train_loss": float("inf")}])
    rows = [_strict_loads(line) for line in (tmp_path / rundir.METRICS_LOG).read_text().splitlines()]
    assert rows == [{"epoch": 1, "test_loss": None, "train_loss": 3.5, "non_finite": {"test_loss": "nan"}},
                    {"epoch": 2, "test_loss": 2.0, "train_loss": None, "non_finite": {"train_loss": "inf"}}]
    rundir.write_metrics(tmp_path, {"iwae_nll": {"mean": float("-inf"), "k": 5}, "per_dim": [0.5, float("nan")]})
    assert _strict_loads((tmp_path / rundir.METRICS_FILE).read_text()) == {
        "iwae_nll": {"mean": None, "k": 5}, "per_dim": [0.5, None], "non_finite": {"iwae_nll/mean": "-inf", "per_dim/1": "nan"}}


class _WrappedDiskError(Exception):
    """As safetensors reports a failed write: the OS error only in its message."""


def test_a_failed_write_names_the_file_asked_for_and_leaves_the_old_one(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the earlier file")
    for error in (OSError(28, "No space left on device"),
                  _WrappedDiskError("Error while serializing: I/O error: No space left on device (os error 28)")):
        with pytest.raises(OSError) as e:
            with files.atomic_path(target) as tmp:
                tmp.write_bytes(b"half a new fi")
                raise error
        assert (e.value.errno, e.value.filename, e.value.strerror) == (28, str(target), "No space left on device")
        assert target.read_bytes() == b"the earlier file" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with pytest.raises(ValueError, match="not a disk error"):  # anything else passes through as it was
        with files.atomic_path(target):
            raise ValueError("not a disk error")


@pytest.fixture
def full_disk(tmp_path):
    """A 3 MB tmpfs, where this machine lets the tests mount one (as root on Linux)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = shutil.which("mount") and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here; test_a_failed_write_names_the_file_asked_for_and_leaves_the_old_one "
                    "injects the same error")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def _fill(folder: Path) -> None:
    """Leave the file system of `folder` a few KB free."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    (folder / "filler").write_bytes((folder / "filler").read_bytes()[:-8192])


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_every_earlier_file(finished, full_disk, tmp_path):
    config = rundir.read_config(finished)
    result = run_cli("train", "--out", str(full_disk / "new"), "--set", "data.name=npz", "--set", f"data.path={config.data.path}",
                     "--set", "train.batch_size=16", "--set", "train.checkpoint_every=1", "--quiet")
    _one_line(result, f"{full_disk / 'new' / 'checkpoints'}/step-", ".safetensors: No space left on device")
    assert ".tmp" not in result.stderr and not list(full_disk.rglob("*.tmp"))
    shutil.rmtree(full_disk / "new")
    run = full_disk / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns(rundir.STATES_DIR))  # a finished run, its weights 1.7 MB
    _fill(full_disk)
    before = _digests(run)
    # The sampler's arrays or its JSON, whichever the disk refuses; nothing of a sampler is left.
    result = run_cli("sampler", "fit", str(run), "gmm", "--components", "2")
    _one_line(result, ": No space left on device")
    assert re.search(rf"error: {re.escape(str(run / 'samplers'))}/gmm-2\.(safetensors|json): No space", result.stderr), result.stderr
    assert _digests(run) == before and not list(full_disk.rglob("*.tmp"))
    _one_line(run_cli("sample", str(run), "-n", "4096", "--out", str(full_disk / "s.png")),
              f"{full_disk / 's.png'}: No space left on device")
    assert _digests(run) == before and not list(full_disk.rglob("*.tmp")) and not (full_disk / "s.png").exists()


def test_weights_of_another_model_say_what_does_not_fit(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = run / rundir.CONFIG_FILE
    config.write_text(config.read_text().replace('arch = "reference"', 'arch = "mlp"'))
    result = run_cli("sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png"))
    # Not only torch's heading line: its first detail too.
    _one_line(result, f"{run / rundir.WEIGHTS_FILE}: does not fit this run's model (Error(s) in loading state_dict for VAE: ")
    assert re.search(r"for VAE: (Missing|Unexpected) key\(s\)", result.stderr), result.stderr


def _train_args(finished: Path) -> list[str]:
    """The command line that trains on the fixture's small dataset."""
    return ["--set", "data.name=npz", "--set", f"data.path={rundir.read_config(finished).data.path}", "--quiet"]


# Sizes no machine has (petabytes), so that the real memory check refuses them anywhere.
ABSURD = [
    (lambda run, out: ["sample", str(run), "-n", str(10**12), "--out", str(out / "s.png")],
     "drawing 1,000,000,000,000 samples needs at least 4,160 TB of memory, and only"),
    (lambda run, out: ["evaluate", str(run), "-k", str(10**15)], "the IWAE with k=1,000,000,000,000,000"),
    (lambda run, out: ["evaluate", str(run), "--samples", str(10**13)], "scoring 10,000,000,000,000 samples needs at least"),
    (lambda run, out: ["train", "--out", str(out / "new"), "--set", "model.arch='conv'", "--set", f"model.latent_dim={10**11}",
                       *_train_args(run)], "the model (model.arch='conv', latent_dim=100000000000, widths=[32, 64, 128]: "),
    (lambda run, out: ["train", "--out", str(out / "new"), "--set", "model.arch='conv'", "--set", f"model.widths=[32, {10**9}]",
                       *_train_args(run)], "weights) needs at least"),
]


@pytest.mark.parametrize("command,message", ABSURD, ids=["sample-n", "evaluate-k", "evaluate-samples", "latent-dim", "widths"])
def test_absurd_sizes_are_refused_before_allocation(finished, command, message, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _digests(run)
    result = run_cli(*command(run, tmp_path))
    _one_line(result, message, "of memory, and only", "available to this process: ")
    assert _digests(run) == before and not (tmp_path / "new").exists() and not (tmp_path / "s.png").exists()


def _main(monkeypatch, capsys, available: int | None, *args: str) -> str:
    """`bdvae ARGS` in this process, with `available` bytes of memory as the checks see it (None:
    unknown, so that only the allocator stops a request); its stderr, after asserting exit 2."""
    from bdvae import __main__, devices

    monkeypatch.setattr(devices, "available_memory", lambda device: available)
    assert __main__.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("bdvae: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_batch_or_mixture_larger_than_the_memory_left_is_refused(finished, tmp_path, monkeypatch, capsys):
    """With 8 MB left, as a busy machine might have: a training step of 32 images (whose weights
    fit) is refused, naming the setting to lower; with 200 kB, a 64-component mixture of 1,000 latents."""
    from bdvae import devices
    from bdvae.samplers import FitOptions, GaussianMixture

    err = _main(monkeypatch, capsys, 8 * 10**6, "train", "--out", str(tmp_path / "new"), "--set", "train.batch_size=32",
                *_train_args(finished))
    assert "a training step of train.batch_size=32 needs at least" in err and "use a smaller train.batch_size" in err
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(devices, "available_memory", lambda device: 2 * 10**5)
    with pytest.raises(BdvaeError, match=r"gmm-64 on 1,000 latents needs at least 643 kB of memory, and only 200 kB "
                                         r"is available to this process: use fewer components"):
        GaussianMixture.fit(torch.randn(1000, 16), FitOptions(kind="gmm", components=64), print)


def test_an_allocation_the_checks_did_not_foresee_is_one_line(finished, tmp_path, monkeypatch, capsys):
    """Where the memory left cannot be read, the allocator's own refusal is the one line."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _digests(run)
    err = _main(monkeypatch, capsys, None, "sample", str(run), "-n", str(10**11), "--out", str(tmp_path / "s.png"))
    assert "out of memory: an allocation of 6,400.0 GB failed; ask for less" in err
    assert _digests(run) == before and not (tmp_path / "s.png").exists()


def test_the_memory_left_counts_the_address_space_limit():
    """`ulimit -v` caps what the process can map, whatever the machine has: the check sees it."""
    script = """
import resource, torch
from bdvae.devices import available_memory
mapped = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 300 * 2**20, resource.RLIM_INFINITY))
print(available_memory(torch.device("cpu")))
"""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc here")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert 0 < int(result.stdout) <= 300 * 2**20


def _finite_weights(finished: Path, tmp_path: Path, change) -> Path:
    """A copy of the run whose weights `change` edits, recorded as training would have written them."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = run / rundir.WEIGHTS_FILE
    state = load_file(str(weights))
    change(state)
    save_file(state, str(weights))
    facts = json.loads((run / rundir.RUN_FILE).read_text())
    facts[rundir.WEIGHTS_SHA256] = rundir.weights_digest(run)
    (run / rundir.RUN_FILE).write_text(json.dumps(facts))
    return run


def test_finite_weights_that_overflow_are_one_line_in_evaluate(finished, tmp_path):
    def scale_encoder(state):
        for name in state:
            if name.startswith("encoder."):
                state[name] = state[name] * 1e6  # finite, but mu and logvar reach float32's limit

    run = _finite_weights(finished, tmp_path, scale_encoder)
    before = _digests(run)
    _one_line(run_cli("evaluate", str(run), "-k", "2", "--samples", "32", "--no-pictures"),
              f"{run}: the ", "are not finite for 32 of 32 test images, although the weights are")
    assert _digests(run) == before


def test_a_collapsed_posterior_is_evaluated_not_a_linear_algebra_error(finished, tmp_path):
    """Every posterior the same point (zero encoder weights, logvar -200): singular covariances, which
    the prior match and the sample scores report rather than fail on."""
    def collapse(state):
        encoder = sorted(name for name in state if name.startswith("encoder."))
        for name in encoder:
            state[name] = torch.zeros_like(state[name])
        last = max((name for name in encoder if name.endswith(".bias")), key=lambda n: int(n.split(".")[1]))
        state[last][state[last].numel() // 2:] = -200.0  # logvar

    run = _finite_weights(finished, tmp_path, collapse)
    result = bdvae.evaluate(run, k=2, samples=32, pictures=False, progress=False)
    assert result["prior_match"]["cov_eigenvalue_max"] == pytest.approx(0, abs=1e-12)
    assert result["prior_match"]["active_units"] == 0
    assert math.isfinite(result["prior_match"]["aggregate_bhattacharyya"]) and result["prior_match"]["aggregate_bhattacharyya"] > 100


def test_a_failing_statistic_is_one_line_naming_it(finished):
    from bdvae import evaluation, metrics

    z = torch.full((32, 16), float("nan"))
    with pytest.raises(BdvaeError, match=r"the prior match cannot be computed: linalg.eigh"):
        evaluation._statistic(bdvae.load_run(finished), "the prior match", metrics.prior_match, z, z, z, torch.Generator())
