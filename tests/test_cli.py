"""End to end: the real `bdvae` command in a subprocess, on a slice of the real MNIST."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

GRID_PX = 8 * (32 + 2) + 2  # 8 x 8 tiles of 32 px with 2-px gaps


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64) / 255


def _tiles(array):
    return np.stack([array[2 + r * 34: 2 + r * 34 + 32, 2 + c * 34: 2 + c * 34 + 32] for r in range(8) for c in range(8)])


@pytest.mark.slow
def test_run_directory_holds_every_file(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.toml", "run.json", "model.safetensors", "metrics.jsonl", "loss_curve.png",
            "originals.png", "reconstructions.png", "samples.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # no temporary file left behind
    for name in ("originals.png", "reconstructions.png", "samples.png"):
        with Image.open(trained_run / name) as im:
            assert im.size == (GRID_PX, GRID_PX)
    facts = json.loads((trained_run / "run.json").read_text())
    assert facts["image_shape"] == [1, 32, 32] and facts["train_images"] == 12000


def test_test_loss_fell_and_both_divergences_are_recorded(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    for r in rows:
        assert r["test_reg"] == r["test_bhattacharyya"]  # the default regularizer is BD
        assert r["test_kl"] > r["test_bhattacharyya"] > 0
        assert r["test_loss"] == pytest.approx(r["test_recon_nll"] + r["test_reg"])


def test_each_reconstruction_is_closest_to_its_own_original(trained_run):
    originals = _tiles(_png(trained_run / "originals.png"))
    reconstructions = _tiles(_png(trained_run / "reconstructions.png"))
    mse = ((reconstructions[:, None] - originals[None]) ** 2).mean(axis=(2, 3))  # (recon, original)
    assert (mse.argmin(axis=1) == np.arange(64)).all()


@pytest.mark.slow
def test_sample_is_reproducible_with_a_seed(trained_run, tmp_path):
    for name in ("a.png", "b.png"):
        result = run_cli("sample", str(trained_run), "-n", "16", "--seed", "3", "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    again = run_cli("sample", str(trained_run), "-n", "16", "--out", str(tmp_path / "a.png"))
    assert again.returncode == 2 and "file exists; pass --overwrite" in again.stderr
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    assert a.shape == (4 * 34 + 2, 4 * 34 + 2)
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0.05  # not a blank picture


def test_reconstruct_writes_alternating_rows(trained_run, tmp_path):
    result = run_cli("reconstruct", str(trained_run), "-n", "16", "--out", str(tmp_path / "r.png"))
    assert result.returncode == 0, result.stderr
    assert _png(tmp_path / "r.png").shape == (4 * 34 + 2, 8 * 34 + 2)


def test_existing_run_directory_is_never_overwritten(trained_run):
    before = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    result = run_cli("train", "--out", str(trained_run), "--set", "train.epochs=1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "run directory exists; pass --overwrite" in result.stderr
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args,message", [
    (["train", "--set", "objective.regularizer=jensen_shannon"], "objective.regularizer must be one of"),
    (["train", "--set", "objective.beta=-0.5"], "objective.beta must be >= 0"),
    (["train", "--set", "train.batch_size=0"], "train.batch_size must be positive"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--config", "/nonexistent/c.toml"], "cannot read config /nonexistent/c.toml"),
    (["sample", "/nonexistent/run", "--out", "x.png"], "not a finished run"),
    (["data", "fetch", "mnist", "--source-dir", "/nonexistent/idx"], "/nonexistent/idx: not a folder"),
    (["teleport"], "invalid choice: 'teleport'"),
    (["train", "--preset", "qualty"], "unknown preset 'qualty'; valid: quality, reference"),
    (["compare", "--preset", "qualty", "--out", "x"], "unknown preset 'qualty'; valid: quality, reference"),
    (["train", "--resume", "x", "--preset", "quality"], "it takes no --preset"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    result = run_cli(*args, "--data-dir", str(tmp_path)) if args[0] == "data" else run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("bdvae: error:") and result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr


def test_corrupt_data_is_one_line_and_leaves_no_run_directory(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"\x00\x00\x08\x03garbage")
    result = run_cli("train", "--out", str(tmp_path / "run"), "--set", "data.name=idx",
                     "--set", f"data.path='{tmp_path / 'x.idx'}'")
    assert result.returncode == 2
    assert "IDX header is truncated" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_data_fetch_checks_a_filled_cache_again(mnist_dir, tmp_path):
    import shutil

    shutil.copytree(mnist_dir / "mnist", tmp_path / "mnist")
    labels = np.load(tmp_path / "mnist" / "train_labels.npy")
    labels[0] = (labels[0] + 1) % 10
    np.save(tmp_path / "mnist" / "train_labels.npy", labels)
    result = run_cli("data", "fetch", "mnist", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "train_labels.npy: checksum mismatch in the data cache" in result.stderr


def test_python_api_round_trip(trained_run):
    import torch

    import bdvae

    run = bdvae.load_run(trained_run)
    x = torch.from_numpy(_tiles(_png(trained_run / "originals.png"))[:4]).float()[:, None]
    mu, logvar = run.encode(x)
    assert mu.shape == logvar.shape == (4, 16)
    recon = run.reconstruct(x)
    torch.testing.assert_close(recon, run.decode(mu))
    torch.testing.assert_close(run.sample(3, seed=5), run.sample(3, seed=5))
    assert run.sample(3, seed=5).shape == (3, 1, 32, 32)


def test_python_api_trains_and_refuses_an_existing_run(mnist_dir, tmp_path):
    import bdvae
    from bdvae.config import Config, DataConfig, TrainConfig
    from bdvae.errors import BdvaeError

    config = Config(data=DataConfig(data_dir=str(mnist_dir), train_size=256, test_size=64), train=TrainConfig(epochs=1))
    run_dir = bdvae.train(config, tmp_path / "api", progress=False)
    run = bdvae.load_run(run_dir)
    assert run.config == config and run.image_shape == (1, 32, 32)
    with pytest.raises(BdvaeError, match="run directory exists"):
        bdvae.train(config, run_dir)


def test_weights_of_another_architecture_are_one_line(trained_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    config = (run_dir / "config.toml").read_text()
    (run_dir / "config.toml").write_text(config.replace('arch = "reference"', 'arch = "mlp"'))
    result = run_cli("sample", str(run_dir), "--out", str(tmp_path / "s.png"))
    assert result.returncode == 2
    assert f"{run_dir / 'model.safetensors'}: does not fit this run's model" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "s.png").exists()


def test_unwritable_output_directory_is_one_line(mnist_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli("train", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "a-file" / "run"),
                     "--set", "data.train_size=64", "--set", "data.test_size=64", "--quiet")
    assert result.returncode == 2
    assert f"{tmp_path / 'a-file' / 'run'}: cannot write there" in result.stderr and result.stderr.count("\n") == 1
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_without_out_a_preset_or_an_aggregate_term_gets_a_folder_of_its_own():
    from bdvae.__main__ import default_run_dir
    from bdvae.config import load

    def named(preset=None, *overrides):
        return default_run_dir(load(None, list(overrides), preset=preset), preset).as_posix()

    assert named() == "runs/bhattacharyya-beta1-seed0"  # the quick start's run
    assert named(None, "objective.regularizer=kl", "train.seed=2") == "runs/kl-beta1-seed2"
    assert named("quality") == "runs/quality-bhattacharyya-beta1-seed0"
    assert (named(None, "objective.aggregate=mmd", "objective.aggregate_weight=300")
            == "runs/bhattacharyya-beta1-agg-mmd300-seed0")


def test_train_help_lists_the_presets():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    assert "--preset NAME" in result.stdout and "quality, reference" in " ".join(result.stdout.split())


@pytest.mark.parametrize("command", [["sample"], ["sampler", "fit"], ["sampler", "list"], ["reconstruct"], ["evaluate"]])
def test_every_run_argument_says_what_it_takes(command, capsys):
    from bdvae.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    assert re.search(r"^  RUN +a run directory written by", capsys.readouterr().out, re.MULTILINE)


@pytest.mark.parametrize("command", [["evaluate", "RUN"], ["compare", "--out", "OUT"]])
def test_the_command_lines_evaluation_defaults_are_evaluate_options(command, capsys):
    """The parser declares the evaluation flags from EvalOptions (in options.py, which imports no
    torch): their defaults are its defaults and their help its fields' docstrings."""
    from bdvae.__main__ import build_parser
    from bdvae.config import docstrings
    from bdvae.options import EvalOptions

    args = vars(build_parser().parse_args(command))
    defaults = EvalOptions()
    for field in ("k", "samples", "test_size", "seed", "max_batch", "dtype"):
        if field in args:
            assert args[field] == getattr(defaults, field), field
    assert tuple(args["samplers"].split(",")) == defaults.samplers
    with pytest.raises(SystemExit):
        build_parser().parse_args([command[0], "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert docstrings(EvalOptions)["k"].rstrip(".") + " (default 100)" in shown


@pytest.mark.parametrize("command", [["evaluate", "RUN"], ["compare", "--out", "OUT"]])
def test_dtype_is_the_arithmetic_and_precision_its_hidden_old_name(command, capsys):
    """--dtype names the IWAE decoder's arithmetic (choices in --help); --precision, its first
    name, still works in old scripts but is not shown: the word is the sample-quality metric's."""
    from bdvae import __main__ as cli, devices
    from bdvae.errors import BdvaeError

    assert cli.DEVICES == devices.DEVICES
    parser = cli.build_parser()
    assert parser.parse_args([*command, "--dtype", "bf16"]).dtype == "bf16"
    assert parser.parse_args([*command, "--precision", "fp32"]).dtype == "fp32"
    assert parser.parse_args(command).dtype == "auto"
    with pytest.raises(BdvaeError, match=r"argument --dtype: invalid choice: 'fp16'"):
        parser.parse_args([*command, "--dtype", "fp16"])
    with pytest.raises(SystemExit):
        parser.parse_args([command[0], "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--dtype {auto,fp32,bf16}" in shown and "--precision" not in shown


def test_the_terminal_table_of_a_published_evaluation():
    """`bdvae evaluate`'s table, from metrics.FIGURES, on the quality preset's published metrics.json,
    which names the arithmetic "precision" as bdvae first did: read as "dtype"."""
    from pathlib import Path

    from bdvae.__main__ import format_table
    from bdvae.rundir import read_metrics

    published = Path(__file__).resolve().parents[1] / "docs/results/quality-preset/runs/kl-beta1-seed0"
    assert '"precision": "bf16"' in (published / "metrics.json").read_text()  # the old key
    lines = [" ".join(line.split()) for line in format_table(read_metrics(published)).splitlines()]
    for expected in ("test images 10000", "reconstruction MSE per pixel 0.00455 ± 0.00002",
                     "KL(q(z|x) || N(0,I)) (nats) 29.33 ± 0.07", "per latent dimension 0.917",
                     "-ln p(x), IWAE K=5000, decoder in bf16 on cpu (nats) 84.05 ± 0.21",
                     "MMD² of two N(0,I) samples (the null) 0.00003", "active units 32",
                     "sample quality, z ~ N(0, I) 10000 samples against 10000 test images", "Fréchet distance 355.76",
                     "sampler gmm-10 10000 samples against 10000 test images",
                     "test-latent ln p(z) -43.76 ± 0.04", "Fréchet distance 97.20"):
        assert expected in lines
    # Every group of sample-quality figures opens with what it scored: the prior's, then gmm-10's.
    gmm = lines.index("sampler gmm-10 10000 samples against 10000 test images")
    assert lines.index("sample quality, z ~ N(0, I) 10000 samples against 10000 test images") + 1 == lines.index(
        "Fréchet distance 355.76")
    assert gmm < lines.index("test-latent ln p(z) -43.76 ± 0.04") < lines.index("Fréchet distance 97.20")
    assert sum(line.endswith("samples against 10000 test images") for line in lines) == 3  # prior, gmm-10, two_stage


def test_config_show_prints_the_resolved_config_that_config_takes_back(tmp_path):
    from bdvae import config as config_lib

    result = run_cli("config", "show", "--preset", "quality", "--set", "objective.beta=2")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("# bdvae's configuration: preset 'quality'")
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    assert config_lib.load(shown) == config_lib.load(None, ["objective.beta=2"], preset="quality")
    bad = run_cli("config", "show", "--set", "train.epohcs=3")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("bdvae: error: unknown key train.epohcs (did you mean train.epochs?); valid: ")
    assert bad.stderr.count("\n") == 1
    help_text = run_cli("train", "--help").stdout
    assert "`bdvae config show` prints every key, its default and meaning" in help_text and "--set SECTION.KEY=VALUE" in help_text


@pytest.mark.parametrize("argv,launched", [
    (["train", "--nproc", "2", "--set", "train.epochs=1"], ["train", "--set", "train.epochs=1"]),
    (["train", "--nproc=2", "--quiet"], ["train", "--quiet"]),
    (["train", "--npr", "4", "--out", "x"], ["train", "--out", "x"]),  # argparse takes a prefix for the flag
    (["train", "--resume", "runs/a", "--nproc", "2", "--device", "cpu"], ["train", "--resume", "runs/a", "--device", "cpu"]),
])
def test_nproc_launches_the_command_line_as_given_less_nproc(argv, launched):
    from bdvae.__main__ import _without_nproc, build_parser

    assert build_parser().parse_args(argv).nproc in (2, 4)  # the flag as argparse reads it
    assert _without_nproc(argv) == launched


def test_bash_completes_commands_flags_and_choices():
    """`bdvae completion bash` sourced in a real bash: the completion function it defines offers
    the sub-command, the flag and the flag's choices."""
    pytest.importorskip("shtab")
    script = run_cli("completion", "bash")
    assert script.returncode == 0, script.stderr

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (f'source /dev/stdin; COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; '
                 f'COMP_LINE={line!r}; COMP_POINT={len(line)}; _shtab_bdvae; echo "${{COMPREPLY[@]}}"')
        result = subprocess.run(["bash", "-c", probe], input=script.stdout, capture_output=True, text=True, check=False)
        return result.stdout.split()

    assert complete("bdvae", "eva") == ["evaluate"]
    assert complete("bdvae", "config", "") == ["show"]
    assert complete("bdvae", "evaluate", "--dt") == ["--dtype"]
    assert complete("bdvae", "evaluate", "--dtype", "") == ["auto", "fp32", "bf16"]
    assert complete("bdvae", "train", "--device", "c") == ["cpu", "cuda"]


def test_completion_without_shtab_is_one_line():
    script = "import sys; sys.modules['shtab'] = None; from bdvae.__main__ import main; sys.exit(main(['completion', 'bash']))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "bdvae: error: completion needs the shtab package: pip install 'bdvae[completion]' (or pip install shtab)\n"
