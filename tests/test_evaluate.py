"""`bdvae evaluate` end to end on a small real run, and its one-line errors."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from PIL import Image

from bdvae import evaluation as evaluate, metrics, pictures
from bdvae.api import Run, load_run
from bdvae.config import Config, ModelConfig
from bdvae.data import load_dataset
from bdvae._version import __version__
from bdvae.evaluation import EvalOptions, evaluate_run, iwae_nll
from bdvae.errors import BdvaeError
from bdvae.likelihoods import LIKELIHOODS, to_float
from bdvae.metrics import FIGURES, figure_value, missing_figures
from bdvae.kernels import TapSumConvTranspose2d, iwae_decoder, subpixel_convolution
from bdvae.model import build_model
from conftest import run_cli


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(trained_run, run_dir)
    result = run_cli("evaluate", str(run_dir), "-k", "8", "--samples", "1000", "--quiet")
    assert result.returncode == 0, result.stderr
    return run_dir, result.stdout


@pytest.mark.slow
def test_evaluate_writes_metrics_and_pictures(evaluated):
    run_dir, stdout = evaluated
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test_images"] == 10000  # all of them, whatever test_size the run was trained with
    assert m["iwae_nll"]["k"] == 8 and m["options"]["samples"] == 1000
    for picture in ("latent_histograms", "latent_means", "interpolation", "traversal"):
        assert f"eval/{picture}.png" in m["pictures"] and (run_dir / "eval" / f"{picture}.png").stat().st_size > 1000
    with Image.open(run_dir / "eval" / "traversal.png") as traversal:  # 16 dimensions x 11 values, 2x, in labelled margins
        tiles = pictures.GAP + 32
        margins = pictures.LABEL_MARGINS
        assert traversal.size == (2 * (11 * tiles + pictures.GAP) + margins["left"] + margins["right"],
                                  2 * (16 * tiles + pictures.GAP) + margins["top"] + margins["bottom"])
    assert "-ln p(x), IWAE K=8, decoder in " in stdout and "not a density of the data" in stdout
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert m["iwae_nll"]["device"] == device and f"on {device} (nats)" in stdout
    # The arithmetic is the dtype; "precision" is the sample-quality metric's alone.
    assert m["options"]["dtype"] == "auto" and m["iwae_nll"]["dtype"] in ("fp32", "bf16")
    assert "precision" not in m["options"] and "precision" not in m["iwae_nll"] and "precision" in m["sample_quality"]
    assert m["bdvae_version"] == __version__ and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", m["evaluated"])
    # Each group of sample-quality figures says what it scored: 1000 samples against the 10000 test images.
    lines = [" ".join(line.split()) for line in stdout.splitlines()]
    assert "sample quality, z ~ N(0, I) 1000 samples against 10000 test images" in lines
    assert lines.index("sample quality, z ~ N(0, I) 1000 samples against 10000 test images") + 1 == next(
        i for i, line in enumerate(lines) if line.startswith("Fréchet distance "))
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_evaluate_on_a_missing_gpu_is_one_line_and_keeps_the_metrics(evaluated):
    run_dir, _ = evaluated
    before = (run_dir / "metrics.json").read_bytes()
    result = run_cli("evaluate", str(run_dir), "-k", "2", "--device", "cuda", "--quiet")
    assert result.returncode == 2 and result.stderr == (
        "bdvae: error: --device cuda: torch sees no CUDA GPU here (use --device cpu or auto)\n")
    assert (run_dir / "metrics.json").read_bytes() == before


def test_evaluate_numbers_hang_together(evaluated):
    run_dir, _ = evaluated
    m = json.loads((run_dir / "metrics.json").read_text())
    d = m["divergences"]
    assert d["kl"]["mean"] > d["bhattacharyya"]["mean"] > 0
    assert math.isclose(sum(d["kl_per_dim"]), d["kl"]["mean"], rel_tol=1e-4)
    assert math.isclose(sum(d["bhattacharyya_per_dim"]), d["bhattacharyya"]["mean"], rel_tol=1e-4)
    assert math.isclose(m["neg_elbo"]["mean"], m["reconstruction"]["nll"]["mean"] + d["kl"]["mean"], rel_tol=1e-6)
    # IWAE with K = 8 is a tighter bound than the ELBO: -ln p(x) below the negative ELBO, not absurdly so.
    assert m["neg_elbo"]["mean"] - 15 < m["iwae_nll"]["mean"] < m["neg_elbo"]["mean"]
    pm = m["prior_match"]
    assert 0 < pm["cov_eigenvalue_min"] <= pm["cov_eigenvalue_max"] and 0 <= pm["active_units"] <= 16
    assert pm["mmd2"] > abs(pm["mmd2_null"])  # a 3-epoch BD model's q(z) is measurably not N(0, I)
    sq = m["sample_quality"]
    assert sum(sq["class_counts"]) == 1000 and 1 <= sq["classifier_score"] <= 10
    assert 0 <= sq["precision"] <= 1 and 0 <= sq["recall"] <= 1 and sq["frechet_distance"] > 0


def test_evaluate_is_deterministic_given_the_seed(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    options = EvalOptions(k=4, samples=300, test_size=200, pictures=False)
    a = evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    b = evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    for key in ("iwae_nll", "neg_elbo", "reconstruction", "sample_quality"):
        assert {k: v for k, v in a[key].items() if k != "importance_samples_per_second"} == \
               {k: v for k, v in b[key].items() if k != "importance_samples_per_second"}
    assert a["test_images"] == 200


def _iwae_figure(metrics_json: dict) -> tuple[float, float]:
    return metrics_json["iwae_nll"]["mean"], metrics_json["iwae_nll"]["std_error"]


def test_a_stopped_iwae_is_taken_up_where_it_stopped_and_gives_the_same_figure(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    options = EvalOptions(k=4, samples=300, test_size=350, pictures=False)
    whole = evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    assert whole["iwae_nll"]["resumed_after_images"] == 0
    (run_dir / "metrics.json").unlink()

    # The same evaluation, its progress saved after every step of 100 images, stopped by Ctrl-C in its third.
    monkeypatch.setattr(evaluate, "IWAE_SAVE_SECONDS", 0.0)
    real, steps = metrics.iwae_log_likelihood, []

    def counted(*args, stop_at=None, **kwargs):
        steps.append(len(args[2]))
        if len(steps) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "iwae_log_likelihood", lambda *a, **kw: counted(*a, stop_at=3, **kw))
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    progress_file = run_dir / "eval" / "iwae-progress.safetensors"
    assert progress_file.is_file() and not (run_dir / "metrics.json").exists()

    steps.clear()
    monkeypatch.setattr(metrics, "iwae_log_likelihood", counted)
    lines: list[str] = []
    resumed = evaluate_run(run_dir, options, progress=False, log=lines.append)
    assert "IWAE: taking up an unfinished pass after 200 of 350 test images" in lines
    assert steps == [100, 50]  # only the images not done before
    assert _iwae_figure(resumed) == _iwae_figure(whole)  # the same noise for every image: the same figure
    assert resumed["iwae_nll"]["resumed_after_images"] == 200
    assert not progress_file.exists()  # done: the progress goes with the finished metrics.json


def test_progress_of_another_setting_or_damaged_is_not_taken_up(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    options = EvalOptions(k=4, samples=300, test_size=250, pictures=False)
    whole = evaluate_run(run_dir, options, progress=False, log=lambda _: None)
    progress_file = run_dir / "eval" / "iwae-progress.safetensors"
    monkeypatch.setattr(evaluate, "IWAE_SAVE_SECONDS", 0.0)
    real = metrics.iwae_log_likelihood

    def stop_in_the_second_step(*args, **kwargs):
        if stop_in_the_second_step.calls == 1:
            raise KeyboardInterrupt
        stop_in_the_second_step.calls += 1
        return real(*args, **kwargs)

    for other in (EvalOptions(k=5, samples=300, test_size=250, pictures=False),  # another K
                  EvalOptions(k=4, samples=300, test_size=250, pictures=False, seed=1)):  # other noise
        stop_in_the_second_step.calls = 0
        monkeypatch.setattr(metrics, "iwae_log_likelihood", stop_in_the_second_step)
        with pytest.raises(KeyboardInterrupt):
            evaluate_run(run_dir, other, progress=False, log=lambda _: None)
        monkeypatch.setattr(metrics, "iwae_log_likelihood", real)
        lines: list[str] = []
        again = evaluate_run(run_dir, options, progress=False, log=lines.append)
        assert any("an unfinished IWAE of other options or weights; starting anew" in line for line in lines), lines
        assert _iwae_figure(again) == _iwae_figure(whole) and again["iwae_nll"]["resumed_after_images"] == 0

    progress_file.parent.mkdir(exist_ok=True)
    progress_file.write_bytes(b"not a safetensors file")
    lines = []
    again = evaluate_run(run_dir, options, progress=False, log=lines.append)
    assert any("damaged" in line and "the IWAE starts anew" in line for line in lines), lines
    assert _iwae_figure(again) == _iwae_figure(whole) and not progress_file.exists()


def test_binarized_models_are_scored_on_a_once_binarized_test_set():
    assert "Burda et al. 2015" in LIKELIHOODS["bernoulli_binarized"].note
    assert "not a density" in LIKELIHOODS["bernoulli"].note
    assert "density of the continuous" in LIKELIHOODS["gaussian"].note


def test_option_ranges():
    # str(e) names the Python argument, e.command_line the flag (what `bdvae evaluate` prints).
    with pytest.raises(BdvaeError, match="^k must be positive") as e:
        EvalOptions(k=0)
    assert e.value.command_line == "-k must be positive, got 0"
    with pytest.raises(BdvaeError, match=r"^seed must be in \[0, 2\*\*63\)") as e:
        EvalOptions(seed=-1)
    assert e.value.command_line == "--seed must be in [0, 2**63), got -1"
    with pytest.raises(BdvaeError, match="^dtype must be one of 'auto', 'fp32', 'bf16', got 'fp16'") as e:
        EvalOptions(dtype="fp16")
    assert e.value.command_line == "--dtype must be one of auto, fp32, bf16, got 'fp16'"


def test_subpixel_convolution_is_the_transposed_convolution():
    gen = torch.Generator().manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(5, 3, 4, 2, 1, dtype=torch.float64)
    with torch.no_grad():  # float64 weights that float32 cannot hold, so any rounding would show
        for p in deconv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        h = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(subpixel_convolution(deconv)(h), deconv(h), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="k=4, s=2, p=1"):
        subpixel_convolution(torch.nn.ConvTranspose2d(5, 3, 3, 2, 1))


@pytest.mark.parametrize("c_in,c_out,h,w,bias", [(32, 1, 16, 16, True), (5, 3, 6, 7, True), (4, 2, 1, 1, False),
                                                  (3, 4, 2, 5, True)])
def test_tap_sums_are_the_transposed_convolution_and_defer_to_the_sub_pixel_form_under_autocast(c_in, c_out, h, w, bias):
    gen = torch.Generator().manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias, dtype=torch.float64)
    with torch.no_grad():  # float64 weights that float32 cannot hold, so any rounding would show
        for p in deconv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        inputs = torch.randn(3, c_in, h, w, generator=gen, dtype=torch.float64)
        layer = TapSumConvTranspose2d(deconv)
        for x in (inputs, inputs.contiguous(memory_format=torch.channels_last)):  # the usual layout, the IWAE's
            torch.testing.assert_close(layer(x), deconv(x), rtol=0, atol=1e-12)
        x = inputs.float()
        layer, deconv = layer.float(), deconv.float()
        subpixel_calls = []
        layer.subpixel.register_forward_hook(lambda *_: subpixel_calls.append(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            assert subpixel_calls == [1] and y.equal(layer.subpixel(x))
        subpixel_calls.clear()
        y = layer(x)  # fp32: the tap sums (whose rounding may or may not match the sub-pixel form's bit for bit)
        assert subpixel_calls == [] and y.dtype == torch.float32
        torch.testing.assert_close(y, deconv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k=4, s=2, p=1"):
        TapSumConvTranspose2d(torch.nn.ConvTranspose2d(5, 3, 3, 2, 1))


@pytest.mark.parametrize("arch,shape", [("reference", (1, 32, 32)), ("conv", (3, 32, 32)), ("mlp", (1, 28, 28)),
                                        ("resnet", (1, 32, 32))], ids=["reference", "conv-rgb", "mlp", "resnet"])
def test_the_iwae_decoder_computes_the_models_decoder_and_leaves_the_model_alone(arch, shape):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), Config().objective, shape).eval()
    for m in model.modules():  # BatchNorms as a trained model has them, not the identity of a fresh one
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(m.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(type(m), getattr(m, "inplace", None)) for m in model.modules()]
    z = 3 * torch.randn(50, 16)
    with torch.inference_mode():
        torch.testing.assert_close(iwae_decoder(model)(z), model.decode(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert all(p.is_contiguous() for p in model.parameters())
    assert [(type(m), getattr(m, "inplace", None)) for m in model.modules()] == modules  # no layer swapped


def _untrained_run(tmp_path, latent_dim: int = 16) -> Run:
    torch.manual_seed(0)
    # The reference architecture fixes 16 latent dimensions; the conv one takes any number.
    config = Config(model=ModelConfig(arch="reference" if latent_dim == 16 else "conv", latent_dim=latent_dim))
    model = build_model(config.model, config.objective, (1, 32, 32)).eval()
    return Run(path=tmp_path, config=config, facts={"image_shape": [1, 32, 32]}, model=model)


def test_the_test_pass_keeps_no_autograd_graph(tmp_path):
    """Its tensors live through the whole evaluation: with a graph, every forward pass's
    activations would live with them (docs/results/prior-hole.md: the GroupNorm evaluations)."""
    run = _untrained_run(tmp_path, 16)
    x = torch.bernoulli(torch.full((30, 1, 32, 32), 0.3), generator=torch.Generator().manual_seed(1))
    terms = evaluate.reconstruction_and_divergences(run, x, x, torch.Generator().manual_seed(2))
    assert all(t.grad_fn is None and not t.requires_grad for t in terms.values())


@pytest.mark.parametrize("latent_dim", [16, 5])  # 5: draws of sizes that are not multiples of 16
def test_the_iwae_estimate_does_not_depend_on_the_decode_batch(tmp_path, latent_dim):
    """The draws come in the same order however they are chunked (so on a GPU, which decodes more
    at once, too), so only rounding may differ."""
    run = _untrained_run(tmp_path, latent_dim)
    x = torch.bernoulli(torch.full((30, 1, 32, 32), 0.3), generator=torch.Generator().manual_seed(1))
    a, b = (iwae_nll(run, x, EvalOptions(k=20, max_batch=m), torch.Generator().manual_seed(2), progress=False)
            for m in (30, 1000))  # 1 sample of each image per decode, then 8
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_a_gpus_decode_batch_is_sized_from_its_free_memory(tmp_path, monkeypatch):
    """No GPU is needed to size it: the free memory is what the device says it has."""
    from bdvae import evaluation
    from bdvae.model import activation_bytes

    run = _untrained_run(tmp_path)
    per_latent = activation_bytes(run.model.decoder, torch.zeros(1, 16))
    gpu, cpu = torch.device("cuda"), torch.device("cpu")

    def batch(free: int | None, **options) -> int:
        monkeypatch.setattr(evaluation, "available_memory", lambda device: free)
        return evaluation.iwae_decode_batch(EvalOptions(**options), gpu, run.model.decoder, 16)

    assert batch(4 * per_latent * 50_000, k=5000) == 32_768  # a quarter of it holds 50,000: the power of 2 below
    assert batch(4 * per_latent * 50_000, k=100) == 8_192  # no more than a step's 100 images times k
    assert batch(4 * per_latent * 10, k=5000) == 256  # at least what a CPU decodes
    assert batch(None, k=5000) == 256  # the free memory unknown
    assert batch(4 * per_latent * 50_000, k=5000, max_batch=1000) == 1000  # --max-batch says
    assert evaluation.iwae_decode_batch(EvalOptions(k=5000), cpu, run.model.decoder, 16) == 256
    assert evaluation.iwae_decode_batch(EvalOptions(k=5000, max_batch=100), cpu, run.model.decoder, 16) == 100


def test_bf16_iwae_is_within_a_tenth_of_a_nat_of_fp32(trained_run):
    """bf16 rounds the decoder's arithmetic only: with the same draws the estimate moves by
    hundredths of a nat (benchmarks/performance.py measures it on 100 images at K = 1000)."""
    run = load_run(trained_run)
    x = to_float(load_dataset(run.config.data, log=lambda _: None).test_images[:40])
    fp32, bf16 = (iwae_nll(run, x, EvalOptions(k=100, dtype=p), torch.Generator().manual_seed(0), progress=False)
                  for p in ("fp32", "bf16"))
    assert abs((bf16 - fp32).mean().item()) < 0.1
    assert (bf16 - fp32).abs().max().item() < 0.5


@pytest.mark.parametrize("args,message", [
    (["evaluate", "/nonexistent/run"], "not a finished run"),
    (["evaluate", "/nonexistent/run", "-k", "0"], "-k must be positive"),
    (["evaluate", "/nonexistent/run", "--samples", "-5"], "--samples must be at least 16"),
    (["evaluate", "/nonexistent/run", "--test-size", "3"], "--test-size must be at least 16"),
    (["evaluate", "/nonexistent/run", "--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from 'auto', 'cpu', 'cuda')"),
    (["classifier", "train", "--out", "/tmp", "--seed", "1"], "--out /tmp: is a folder"),
    (["classifier", "train", "--out", "/nonexistent/c.safetensors", "--seed", str(2**64)], "--seed must be in"),
    (["classifier", "train", "--out", "/nonexistent/dir/c.safetensors"], "folder /nonexistent/dir does not exist"),
])
def test_bad_input_is_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: "/".join(f.path) + f"[{f.scope}]")
def test_every_reported_figure_is_computed_shown_and_required(evaluated, figure):
    """metrics.FIGURES is the one table: each figure is in a real evaluation's metrics.json, in the
    terminal table when it has a row, in the report's columns when it has one, and a metrics.json
    without it is incomplete (compare evaluates again rather than reuse it), unless the figure is
    optional (added after metrics.json files were published): then it is complete without it."""
    run_dir, stdout = evaluated
    m = json.loads((run_dir / "metrics.json").read_text())
    where = m["samplers"]["prior"] if figure.scope == "sampler" else m
    assert figure_value(where, figure.path) is not None
    if figure.row:
        assert figure.row.format_map(m) in stdout
    if figure.column:
        from bdvae.reporting import COLUMNS, SAMPLER_COLUMNS

        assert figure in (SAMPLER_COLUMNS if figure.scope == "sampler" else COLUMNS)
    assert not missing_figures(m)
    parent = figure_value(where, figure.path[:-1])
    del parent[figure.path[-1]]
    assert ("/".join(figure.path) in missing_figures(m)) is not figure.optional
