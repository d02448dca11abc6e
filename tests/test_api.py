"""The Python API as a notebook uses it: every name on `import bdvae`, and train, evaluate,
compare and report returning Python objects, on a small dataset of random images."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import bdvae
from bdvae.config import Config, DataConfig, TrainConfig
from bdvae.errors import BdvaeError

from conftest import run_cli, tiny_npz


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Config:
    path = tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz", train=96, test=32, seed=1)
    return Config(data=DataConfig(name="npz", path=str(path)), train=TrainConfig(epochs=1, batch_size=32, threads=1))


def test_import_bdvae_lists_the_api_for_tab_completion():
    names = dir(bdvae)
    for name in ("train", "resume", "evaluate", "compare", "report", "load_run", "Run", "Callback", "EpochView"):
        assert name in names and name in bdvae.__all__
        assert callable(getattr(bdvae, name)) and getattr(bdvae, name).__doc__, name
    # The API's evaluate, compare and report, not the modules of (almost) the same name.
    assert bdvae.evaluate.__module__ == bdvae.compare.__module__ == bdvae.report.__module__ == "bdvae.api"


def test_evaluate_returns_the_metrics_it_writes(base, tmp_path):
    run = bdvae.load_run(bdvae.train(base, tmp_path / "run", progress=False))
    metrics = run.evaluate(k=3, samples=32, pictures=False, progress=False)
    assert json.loads(json.dumps(metrics)) == json.loads((run.path / "metrics.json").read_text())
    assert metrics["options"]["k"] == 3 and metrics["iwae_nll"]["k"] == 3 and metrics["test_images"] == 32
    assert metrics["iwae_nll"]["mean"] > 0
    again = bdvae.evaluate(run.path, k=3, samples=32, pictures=False, progress=False)["iwae_nll"]
    assert (again["mean"], again["std_error"]) == (metrics["iwae_nll"]["mean"], metrics["iwae_nll"]["std_error"])
    with pytest.raises(TypeError, match="kk"):  # a misspelt option is an error, not ignored
        bdvae.evaluate(run.path, kk=3)


def test_compare_and_report_return_the_runs_and_the_report(base, tmp_path):
    entries = bdvae.compare(tmp_path / "cmp", betas=(1.0, 2.0), seeds=1, base=base, k=2, samples=32,
                            pictures=False, progress=False)
    assert sorted((e.regularizer, e.beta, e.seed) for e in entries) == [
        ("bhattacharyya", 1.0, 0), ("bhattacharyya", 2.0, 0), ("kl", 1.0, 0), ("kl", 2.0, 0)]
    assert all(e.metrics["options"]["k"] == 2 and e.run_dir.parent == tmp_path / "cmp" / "runs" for e in entries)
    assert (tmp_path / "cmp" / "report.html").is_file()
    md, page = bdvae.report([e.run_dir for e in entries], tmp_path / "again")
    assert (md, page) == (tmp_path / "again" / "report.md", tmp_path / "again" / "report.html")
    assert "kl" in md.read_text() and page.stat().st_size > 1000
    with pytest.raises(BdvaeError, match=r"holds a report \(report.md\); pass overwrite=True to replace it"):
        bdvae.report([e.run_dir for e in entries], tmp_path / "again")
    assert bdvae.report([entries[0].run_dir], tmp_path / "again", overwrite=True)[0] == md


def test_a_python_caller_sees_the_log_only_when_it_asks(base, tmp_path, capsys, caplog):
    bdvae.train(base, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().out == ""  # no print from the library
    with caplog.at_level(logging.INFO, logger="bdvae"):
        bdvae.train(base, tmp_path / "told", progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == "bdvae"]
    assert any(m.startswith("training on 96 images") for m in said) and any(m.startswith("epoch 1: train loss") for m in said)
    assert capsys.readouterr().out == ""


def test_evaluate_json_prints_the_metrics_alone_on_stdout(base, tmp_path):
    run_dir = bdvae.train(base, tmp_path / "run", progress=False)
    result = run_cli("evaluate", str(run_dir), "--json", "-k", "2", "--samples", "32", "--no-pictures", "--quiet",
                     "--samplers", "prior,gmm-2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1  # one line: the JSON object
    assert json.loads(result.stdout) == json.loads((run_dir / "metrics.json").read_text())
    assert "fitting gmm-2" in result.stderr  # what the evaluation said, on stderr


def test_errors_name_the_python_call_that_fixes_them(base, tmp_path):
    run_dir = bdvae.train(base, tmp_path / "run", progress=False)
    run = bdvae.load_run(run_dir)
    shape = ", ".join(map(str, run.image_shape))
    for call, message in [
        (lambda: bdvae.train(base, run_dir), f"{run_dir}: run directory exists; pass overwrite=True to replace it or "
                                             "choose another run_dir"),
        (lambda: run.sample(4, sampler="gmm-3"), f"{run_dir}: no fitted sampler 'gmm-3'; fit it with: "
                                                 f"bdvae.load_run({str(run_dir)!r}).fit_sampler('gmm', components=3)"),
        (lambda: bdvae.report([run_dir], tmp_path / "r"), f"{run_dir}: not evaluated; call bdvae.evaluate({str(run_dir)!r}) first"),
        (lambda: run.evaluate(k=0), "k must be positive, got 0"),
        (lambda: bdvae.evaluate(run_dir, dtype="fp16"), "dtype must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        (lambda: bdvae.evaluate(run_dir, device="gpu"), "device must be one of 'auto', 'cpu', 'cuda', got 'gpu'"),
        (lambda: run.sample(0), "n must be a positive integer, got 0"),
        (lambda: run.sample(2, seed=-1), "seed must be in [0, 2**63), got -1"),
        (lambda: run.encode(torch.zeros(2, 3, 32, 32)),
         f"images must be a tensor (B, {shape}), as the run was trained on; got (2, 3, 32, 32)"),
        (lambda: run.encode(torch.full((2, *run.image_shape), 300)),
         "images must be floats in [0, 1] or integer pixels in [0, 255]; got values from 300 to 300"),
        (lambda: run.decode(torch.zeros(2, 3)), f"latents must be a tensor (B, {run.config.model.latent_dim}), got (2, 3)"),
        (lambda: run.fit_sampler("gmm", components=-3), "components must be positive, got -3"),
        (lambda: run.fit_sampler("gmm", seed=-1), "seed must be in [0, 2**63), got -1"),
        (lambda: run.fit_sampler("gmm", components="4"), "components must be an integer, got '4'"),
        (lambda: run.sample(2, sampler=None), 'sampler must be a name ("prior", "gmm-10", ...), got None'),
        (lambda: bdvae.compare(tmp_path / "c", base=base, jobs=0), "jobs must be positive, got 0"),
        (lambda: bdvae.compare(tmp_path / "c", base=base, epochs=0), "train.epochs must be positive, got 0"),
        (lambda: bdvae.train(base, tmp_path / "cb", callbacks=5), "callbacks must be a list of callbacks, got int"),
    ]:
        with pytest.raises(BdvaeError) as e:
            call()
        assert str(e.value) == message
    assert not (tmp_path / "cb").exists() and not (tmp_path / "c" / "runs").exists()  # refused before writing
    run.fit_sampler("gmm-3")
    with pytest.raises(BdvaeError, match=r"fitted already; pass overwrite=True to fit it again$"):
        run.fit_sampler("gmm-3")
    # The command line's lines stay as they were.
    result = run_cli("sample", str(run_dir), "--sampler", "gmm-4", "--out", str(tmp_path / "s.png"))
    assert result.stderr == (f"bdvae: error: {run_dir}: no fitted sampler 'gmm-4'; fit it with: "
                             f"bdvae sampler fit {run_dir} gmm --components 4\n")


def test_images_are_floats_in_0_1_or_integer_pixels_of_any_integer_type(base, tmp_path):
    run = bdvae.load_run(bdvae.train(base, tmp_path / "run", progress=False))
    pixels = torch.randint(0, 256, (4, *run.image_shape), dtype=torch.uint8)
    mu, _ = run.encode(pixels)
    assert torch.equal(run.encode(pixels.long())[0], mu)  # int64 pixels, as numpy and PIL often give
    assert torch.allclose(run.encode(pixels.float() / 255)[0], mu, atol=1e-6)
    assert torch.allclose(run.encode(pixels[0])[0], mu[:1], atol=1e-6)  # one image (C, H, W)
    import numpy as np

    assert run.sample(np.int64(2), seed=0).shape == (2, *run.image_shape)  # a count from numpy is a count


def test_compare_takes_one_regularizer_or_beta_alone_and_keeps_a_report_it_did_not_write(base, tmp_path):
    entries = bdvae.compare(tmp_path / "cmp", regularizers="kl", betas=2, seeds=1, base=base, k=2, samples=32,
                            pictures=False, progress=False)
    assert [(e.regularizer, e.beta) for e in entries] == [("kl", 2.0)]
    written = bdvae.report([entries[0].run_dir], tmp_path / "mine")[0].read_bytes()
    with pytest.raises(BdvaeError, match=r"holds a report \(report.md\) but no runs/ of a comparison"):
        bdvae.compare(tmp_path / "mine", regularizers="kl", betas=2, seeds=1, base=base, k=2, samples=32,
                      pictures=False, progress=False)
    assert (tmp_path / "mine" / "report.md").read_bytes() == written and not (tmp_path / "mine" / "runs").exists()


def test_an_error_keeps_both_lines_through_a_pipe():
    import pickle

    error = pickle.loads(pickle.dumps(BdvaeError("pass --overwrite", python="pass overwrite=True")))
    assert (str(error), error.command_line) == ("pass overwrite=True", "pass --overwrite")
    plain = pickle.loads(pickle.dumps(BdvaeError("one line")))
    assert (str(plain), plain.command_line) == ("one line", "one line")
