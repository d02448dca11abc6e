"""Latent samplers: fitting, storage, log densities, and `evaluate`/`compare`/`sample` with them end to end."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

from bdvae.api import load_run
from bdvae.errors import BdvaeError
from bdvae.rundir import load_sampler, sampler_paths, save_sampler
from bdvae.samplers import SAMPLERS, FitOptions, Flow, GaussianMixture, Prior, TwoStage, canonical_names, parse_name
from conftest import run_cli

MEANS = torch.tensor([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
COVARIANCES = torch.stack([torch.eye(2), torch.tensor([[1.0, 0.6], [0.6, 1.0]]), 0.25 * torch.eye(2)]).double()


def mixture() -> GaussianMixture:
    return GaussianMixture(WEIGHTS, MEANS, COVARIANCES)


def draws(n: int, seed: int) -> torch.Tensor:
    return mixture().sample(n, torch.Generator().manual_seed(seed))


def fitted(kind: str, z: torch.Tensor, seed: int = 0, **options) -> object:
    return SAMPLERS[kind].fit(z, FitOptions(kind=kind, seed=seed, **options), log=lambda m: None)


@pytest.fixture
def short_two_stage(monkeypatch):
    monkeypatch.setattr(TwoStage, "EPOCHS", 8)


@pytest.fixture
def short_flow(monkeypatch):
    monkeypatch.setattr(Flow, "EPOCHS", 8)
    monkeypatch.setattr(Flow, "HIDDEN", (64, 64))


def banana(n: int, seed: int) -> torch.Tensor:
    """z = (2a, 0.4b + a²/2 - 1), a, b ~ N(0, 1): a bent, non-Gaussian density in 2-D."""
    a, b = torch.randn(2, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.stack([2 * a, 0.4 * b + 0.5 * a.square() - 1], 1)


def banana_log_density(z: torch.Tensor) -> torch.Tensor:
    """ln p(z) of the banana: ln N(a) + ln N(b) - ln 2 - ln 0.4, the Jacobian of (a, b) -> z."""
    a = z[:, 0] / 2
    b = (z[:, 1] - 0.5 * a.square() + 1) / 0.4
    return Prior(2).log_density(torch.stack([a, b], 1)) - math.log(2 * 0.4)


@pytest.fixture(scope="module")
def banana_flow() -> Flow:
    """The flow with its default layers, fitted on 4,000 draws of the banana (seed 0)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Flow, "EPOCHS", 12)
        return fitted("flow", banana(4000, seed=0).float())


def test_the_gmm_recovers_a_known_mixture():
    gmm = fitted("gmm", draws(20000, seed=1), components=3)
    key = lambda means: torch.argsort(means[:, 0] * 10 + means[:, 1])  # noqa: E731  (components are unordered)
    mine, truth = key(gmm.means), key(MEANS)
    torch.testing.assert_close(gmm.means[mine], MEANS[truth], atol=0.06, rtol=0)
    torch.testing.assert_close(gmm.weights[mine], WEIGHTS[truth], atol=0.015, rtol=0)
    torch.testing.assert_close(gmm.covariances[mine], COVARIANCES[truth], atol=0.08, rtol=0)


def test_the_gmm_samples_its_own_density():
    # The draws' empirical mean and covariance are those of the mixture it describes.
    z = draws(200000, seed=2).double()
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = (WEIGHTS[:, None, None] * (COVARIANCES + MEANS[:, :, None] * MEANS[:, None, :])).sum(0)
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), second - torch.outer(mean, mean), atol=0.06, rtol=0)


@pytest.mark.parametrize("kind", ["gmm", "two_stage", "flow"])
def test_a_stored_sampler_gives_the_same_draws_and_densities_as_the_fitted_one(kind, tmp_path, short_two_stage,
                                                                               short_flow):
    z = draws(3000, seed=3).float()
    sampler = fitted(kind, z)
    options = FitOptions(kind=kind)
    save_sampler(tmp_path, sampler, options, len(z), seconds=1.0)
    loaded = load_sampler(tmp_path, options.name, latent_dim=2)
    assert type(loaded) is type(sampler)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    torch.testing.assert_close(loaded.sample(500, gen()), sampler.sample(500, gen()), rtol=0, atol=0)
    torch.testing.assert_close(loaded.log_density(z[:200], gen()), sampler.log_density(z[:200], gen()), rtol=0, atol=0)
    assert not torch.equal(sampler.sample(500, gen()), sampler.sample(500, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("kind", ["gmm", "two_stage", "flow"])
def test_fitting_twice_with_the_same_seed_writes_the_same_file(kind, tmp_path, short_two_stage, short_flow):
    z = draws(3000, seed=4).float()
    options = FitOptions(kind=kind, seed=5)
    files = []
    for folder in ("a", "b", "c"):
        seed = 6 if folder == "c" else 5
        (tmp_path / folder).mkdir()
        save_sampler(tmp_path / folder, fitted(kind, z, seed=seed), options, len(z), seconds=0.0)
        files.append(sampler_paths(tmp_path / folder, options.name)[0].read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]  # another seed, another fit


def test_the_second_stage_lowers_its_own_loss(short_two_stage):
    sampler = fitted("two_stage", draws(3000, seed=5).float())
    losses = sampler.losses
    assert len(losses) == TwoStage.EPOCHS and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0, losses
    assert losses[-1] <= min(losses[:-1]) + 0.05, losses  # still going down at the end, not diverging


def test_the_second_stage_is_regularized_as_asked(short_two_stage):
    z = draws(1000, seed=6).float()
    bd, kl = fitted("two_stage", z), fitted("two_stage", z, regularizer="kl")
    assert (bd.regularizer, kl.regularizer) == ("bhattacharyya", "kl")
    # the same seed, the same data: only the regularizer differs, and KL ≈ 4 BD near the prior
    assert kl.losses[0] > bd.losses[0] and kl.losses != bd.losses
    assert parse_name("two_stage-kl") == FitOptions(kind="two_stage", regularizer="kl")


def test_the_flows_density_integrates_to_one(banana_flow):
    # A 2-D grid covering the banana (|a| < 5.5): the exact density, standardization's Jacobian included, has mass 1.
    step = 0.1
    z1, z2 = torch.meshgrid(torch.arange(-11, 11, step), torch.arange(-4, 16, step), indexing="ij")
    density = banana_flow.log_density(torch.stack([z1.flatten(), z2.flatten()], 1)).exp()
    assert density.dtype == torch.float64
    assert density.sum().item() * step**2 == pytest.approx(1.0, abs=0.01)


def test_the_flow_fits_a_density_no_gaussian_can():
    # Held-out latents: the flow comes within 0.1 nats of the banana's own density, the best single
    # Gaussian (a 1-component mixture) is 0.7 nats short of it, N(0, I) further.
    train, test = banana(4000, seed=0).float(), banana(5000, seed=1).float()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Flow, "EPOCHS", 12)
        flow = fitted("flow", train)
    mine, truth = flow.log_density(test).mean().item(), banana_log_density(test.double()).mean().item()
    gaussian = fitted("gmm", train, components=1).log_density(test).mean().item()
    assert truth - 0.1 < mine < truth + 0.05, (mine, truth)
    assert mine > gaussian + 0.5, (mine, gaussian)
    assert mine > Prior(2).log_density(test).mean().item() + 1.5
    assert flow.params()["best_epoch"] >= 8 and len(flow.params()["validation_losses"]) == len(flow.params()["losses"])


def test_the_flow_samples_its_own_density_from_the_callers_generator(banana_flow):
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    torch.manual_seed(1)
    z = banana_flow.sample(10000, gen(2))
    torch.manual_seed(3)  # the global RNG plays no part in a draw
    torch.testing.assert_close(banana_flow.sample(10000, gen(2)), z, rtol=0, atol=0)
    assert not torch.equal(banana_flow.sample(100, gen(4)), z[:100])
    assert z.shape == (10000, 2) and z.dtype == torch.float32
    # the draws follow the banana: its moments, and its own density scores them as it scores its draws
    torch.testing.assert_close(z.double().mean(0), torch.tensor([0.0, -0.5], dtype=torch.float64), atol=0.06, rtol=0)
    torch.testing.assert_close(z.double().std(0), torch.tensor([2.0, math.sqrt(0.66)], dtype=torch.float64),
                               atol=0.06, rtol=0)
    entropy = -banana_log_density(banana(20000, seed=5)).mean().item()
    assert -banana_log_density(z.double()).mean().item() == pytest.approx(entropy, abs=0.1)


def test_the_flow_lowers_its_loss_and_leaves_the_callers_rng_alone(short_flow):
    torch.manual_seed(11)
    before = torch.get_rng_state()
    flow = fitted("flow", draws(3000, seed=5).float())
    assert torch.equal(torch.get_rng_state(), before)
    losses, held_out = flow.params()["losses"], flow.params()["validation_losses"]
    assert len(losses) == len(held_out) <= Flow.EPOCHS and all(math.isfinite(v) for v in losses + held_out)
    assert losses[-1] < losses[0] - 0.2, losses
    assert flow.params()["best_epoch"] == 1 + held_out.index(min(held_out))
    assert flow.params()["zuko"] == __import__("zuko").__version__


def test_a_diverging_flow_is_one_line(short_flow, monkeypatch):
    monkeypatch.setattr(Flow, "LR", 1e4)
    with pytest.raises(BdvaeError, match=r"^flow: the loss became non-finite in epoch 1 .*try another --seed$"):
        fitted("flow", draws(500, seed=6).float())
    with pytest.raises(BdvaeError, match="needs at least 20 latents"):
        fitted("flow", draws(19, seed=6).float())


def test_without_zuko_fitting_or_loading_a_flow_is_one_line(tmp_path, short_flow, monkeypatch):
    z = draws(500, seed=7).float()
    save_sampler(tmp_path, fitted("flow", z), FitOptions(kind="flow"), len(z), seconds=0.0)
    monkeypatch.setitem(sys.modules, "zuko", None)  # `import zuko` raises ImportError
    for attempt in (lambda: fitted("flow", z), lambda: load_sampler(tmp_path, "flow", latent_dim=2)):
        with pytest.raises(BdvaeError) as caught:
            attempt()
        assert str(caught.value) == ("the flow sampler needs zuko, which is not installed: "
                                     "pip install 'bdvae[flow]' (or pip install zuko)")


def test_the_command_line_imports_zuko_only_for_a_flow():
    script = ("import sys; from bdvae.__main__ import build_parser; import bdvae.samplers; "
              "build_parser().format_help(); print(sorted(bdvae.samplers.SAMPLERS), 'zuko' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.stdout == "['flow', 'gmm', 'prior', 'two_stage'] False\n", result.stderr


def test_a_flow_file_that_does_not_fit_its_layers_is_one_line(tmp_path, short_flow):
    z = draws(500, seed=8).float()
    save_sampler(tmp_path, fitted("flow", z), FitOptions(kind="flow"), len(z), seconds=0.0)
    _, json_path = sampler_paths(tmp_path, "flow")
    facts = json.loads(json_path.read_text())
    facts["params"]["hidden_features"] = [32, 32]
    json_path.write_text(json.dumps(facts))
    with pytest.raises(BdvaeError, match=r"flow.safetensors: damaged sampler file \(Error\(s\) in loading state_dict "
                                         r"for MAF: size mismatch"):
        load_sampler(tmp_path, "flow", latent_dim=2)


def test_the_priors_draws_are_the_ones_evaluate_always_scored(trained_run):
    from bdvae.evaluation import decoded_samples

    run = load_run(trained_run)
    d = run.config.model.latent_dim
    before = torch.randn(300, d, generator=torch.Generator().manual_seed(1))  # what evaluate drew before samplers
    torch.testing.assert_close(decoded_samples(run, Prior(d), 300, seed=1), run.decode(before), rtol=0, atol=0)


def test_test_latents_are_likelier_under_a_gmm_fitted_to_their_mixture_than_under_the_prior():
    train, test = draws(20000, seed=7), draws(5000, seed=8)
    gmm = fitted("gmm", train, components=3)
    prior = Prior(2)
    gain = (gmm.log_density(test) - prior.log_density(test)).mean().item()
    assert gain > 2.0, gain
    # and the GMM's figure is the true mixture's, within sampling noise
    truth = mixture().log_density(test)
    assert abs(gmm.log_density(test).mean().item() - truth.mean().item()) < 0.02


def test_on_standard_normal_latents_a_fitted_gmm_scores_as_the_prior_does():
    gen = torch.Generator().manual_seed(9)
    train, test = torch.randn(20000, 4, generator=gen), torch.randn(5000, 4, generator=gen)
    gmm, prior = fitted("gmm", train, components=3), Prior(4)
    diff = gmm.log_density(test) - prior.log_density(test)
    std_error = diff.std().item() / math.sqrt(len(diff))
    assert abs(diff.mean().item()) < max(3 * std_error, 0.01), (diff.mean().item(), std_error)


def test_names_are_canonical_and_bad_names_are_one_line():
    assert canonical_names(["gmm", "two_stage", "gmm-10", "prior"]) == ("prior", "gmm-10", "two_stage")
    assert parse_name("gmm-3").components == 3
    assert parse_name("flow") == FitOptions(kind="flow") and canonical_names(["flow"]) == ("prior", "flow")
    for bad, message in [("maf", "unknown sampler 'maf'; valid: prior, gmm-K (e.g. gmm-10), two_stage, "
                                 "two_stage-REGULARIZER, flow"), ("gmm-x", "expected gmm-K"),
                         ("gmm-0", "components must be positive"), ("two_stage-nope", "unknown regularizer"),
                         ("prior-3", "takes no options"), ("flow-5", "'flow' takes no options")]:
        with pytest.raises(BdvaeError, match=re.escape(message)):
            parse_name(bad)


# End to end, on the session's small real run (12,000 training images, 16 latents).

@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("samplers") / "run"
    shutil.copytree(trained_run, run_dir)
    result = run_cli("evaluate", str(run_dir), "--samplers", "gmm-3,two_stage", "-k", "2", "--samples", "500",
                     "--test-size", "500", "--quiet")
    assert result.returncode == 0, result.stderr
    return run_dir, result.stdout


@pytest.mark.slow
def test_evaluate_fits_and_scores_every_sampler(evaluated):
    run_dir, stdout = evaluated
    m = json.loads((run_dir / "metrics.json").read_text())
    assert list(m["samplers"]) == ["prior", "gmm-3", "two_stage"]
    assert m["options"]["samplers"] == ["prior", "gmm-3", "two_stage"]
    assert m["sample_quality"] == m["samplers"]["prior"]["sample_quality"]  # the prior's, as before samplers came
    prior = m["samplers"]["prior"]
    for name in ("gmm-3", "two_stage"):
        entry = m["samplers"][name]
        assert entry["sample_quality"]["samples"] == 500
        assert entry["frechet_ratio"] == pytest.approx(
            prior["sample_quality"]["frechet_distance"] / entry["sample_quality"]["frechet_distance"])
        assert entry["fit"]["fit"] == {"seed": 0, "fit_on": "sample", "latents": 12000}
        # q(z) is not N(0, I): a density fitted to it scores the unseen test latents higher
        assert entry["test_latent_log_density"]["mean"] > prior["test_latent_log_density"]["mean"], name
        assert (run_dir / "eval" / f"samples-{name}.png").stat().st_size > 500
        # the sampler's rows: its heading, with what its samples were scored against, then its figures
        assert re.search(rf"^sampler {name} +500 samples against 500 test images\n  test-latent ln p\(z\) ", stdout, re.M), stdout
    assert prior["frechet_ratio"] == 1.0 and "not scored" not in stdout  # every fitted sampler was
    assert sorted(p.name for p in (run_dir / "samplers").iterdir()) == [
        "gmm-3.json", "gmm-3.safetensors", "two_stage.json", "two_stage.safetensors"]


@pytest.mark.slow
def test_a_second_evaluate_reuses_the_fitted_samplers(evaluated):
    run_dir, _ = evaluated
    before = {p.name: p.read_bytes() for p in (run_dir / "samplers").iterdir()}
    result = run_cli("evaluate", str(run_dir), "--samplers", "gmm-3", "-k", "2", "--samples", "300",
                     "--test-size", "300", "--no-pictures", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "fitting" not in result.stdout
    assert {p.name: p.read_bytes() for p in (run_dir / "samplers").iterdir()} == before
    # two_stage is fitted there too: the output says how to score it.
    assert "fitted in the run but not scored: two_stage (--samplers two_stage scores them)" in result.stdout


@pytest.mark.slow
def test_an_evaluation_leaves_no_picture_of_an_earlier_one(evaluated, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated[0], run_dir)
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "samples-two_stage.png").write_bytes(b"an earlier evaluation's")
    pictures = lambda: sorted(f"eval/{p.name}" for p in (run_dir / "eval").glob("*.png"))  # noqa: E731
    args = ("evaluate", str(run_dir), "--samplers", "gmm-3", "-k", "2", "--samples", "300", "--test-size", "300", "--quiet")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    ours = ["eval/interpolation.png", "eval/latent_histograms.png", "eval/latent_means.png", "eval/samples-gmm-3.png",
            "eval/samples-prior.png", "eval/traversal.png"]
    assert pictures() == ours == json.loads((run_dir / "metrics.json").read_text())["pictures"]
    result = run_cli(*args, "--no-pictures")
    assert result.returncode == 0, result.stderr
    assert pictures() == [] and "pictures" not in json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_sample_and_the_api_draw_from_a_fitted_sampler(evaluated, tmp_path):
    run_dir, _ = evaluated
    result = run_cli("sample", str(run_dir), "--sampler", "gmm-3", "--seed", "1", "-n", "16", "--out", str(tmp_path / "g.png"))
    assert result.returncode == 0, result.stderr
    assert "the fitted sampler gmm-3" in result.stdout and (tmp_path / "g.png").stat().st_size > 200
    run = load_run(run_dir)
    a, b = run.sample(16, seed=1, sampler="gmm-3"), run.sample(16, seed=1, sampler="gmm-3")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, run.sample(16, seed=1))  # the prior's draws differ
    listing = run_cli("sampler", "list", str(run_dir))
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()[1:]]
    assert names == ["prior", "gmm-3", "two_stage"]
    assert "12000 z ~ q(z|x)" in listing.stdout


@pytest.mark.slow
def test_sampler_fit_is_reproducible_and_keeps_what_was_fitted(trained_run, tmp_path):
    copies = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        shutil.copytree(trained_run, run_dir)
        result = run_cli("sampler", "fit", str(run_dir), "gmm", "--components", "4", "--seed", "3", "--fit-on", "mean")
        assert result.returncode == 0, result.stderr
        assert "fitted gmm-4" in result.stdout
        copies.append(run_dir)
    files = [sampler_paths(d, "gmm-4")[0].read_bytes() for d in copies]
    assert files[0] == files[1]
    facts = json.loads(sampler_paths(copies[0], "gmm-4")[1].read_text())
    assert facts["fit"] == {"seed": 3, "fit_on": "mean", "latents": 12000} and facts["latent_dim"] == 16
    again = run_cli("sampler", "fit", str(copies[0]), "gmm-4")
    assert again.returncode == 2 and "fitted already; pass --overwrite" in again.stderr
    assert sampler_paths(copies[0], "gmm-4")[0].read_bytes() == files[0]


@pytest.mark.parametrize("damage", ["truncated", "other latent size", "no json"])
@pytest.mark.slow
def test_a_bad_sampler_file_is_one_line_and_nothing_is_lost(evaluated, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated[0], run_dir)
    weights, facts = sampler_paths(run_dir, "gmm-3")
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-40])
        message = "damaged sampler file"
    elif damage == "other latent size":
        z = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
        save_sampler(run_dir, fitted("gmm", z, components=3), FitOptions(kind="gmm", components=3), len(z), 0.0)
        message = "fitted for 8 latent dimensions, this run's model has 16"
    else:
        facts.unlink()
        message = "no fitted sampler 'gmm-3'; fit it with: bdvae sampler fit"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    commands = [["sample", str(run_dir), "--sampler", "gmm-3", "--out", str(tmp_path / "s.png")]]
    if damage != "no json":  # without its JSON a sampler counts as never fitted: evaluate fits it
        commands.append(["evaluate", str(run_dir), "--samplers", "gmm-3", "-k", "2", "--samples", "300",
                         "--test-size", "300"])
    for args in commands:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "s.png").exists()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_flow_is_fitted_drawn_from_and_scored_from_the_command_line(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    result = run_cli("sampler", "fit", str(run_dir), "flow")
    assert result.returncode == 0, result.stderr
    assert "fitted flow (16 latent dimensions)" in result.stdout
    facts = json.loads(sampler_paths(run_dir, "flow")[1].read_text())
    assert facts["fit"]["latents"] == 12000 and facts["params"]["transforms"] == Flow.TRANSFORMS
    result = run_cli("sample", str(run_dir), "--sampler", "flow", "--seed", "1", "-n", "16", "--out", str(tmp_path / "f.png"))
    assert result.returncode == 0, result.stderr
    assert "the fitted sampler flow" in result.stdout and (tmp_path / "f.png").stat().st_size > 200
    result = run_cli("evaluate", str(run_dir), "--samplers", "flow", "-k", "2", "--samples", "300", "--test-size", "300",
                     "--no-pictures", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "fitting" not in result.stdout  # the stored flow, not a new fit
    m = json.loads((run_dir / "metrics.json").read_text())["samplers"]
    assert m["flow"]["test_latent_log_density"]["mean"] > m["prior"]["test_latent_log_density"]["mean"] + 1.0


def test_without_zuko_sampler_fit_flow_is_one_line_and_writes_nothing(trained_run):
    before = sorted(p.name for p in trained_run.rglob("*"))
    script = (f"import sys; sys.modules['zuko'] = None; from bdvae.__main__ import main; "
              f"sys.exit(main(['sampler', 'fit', {str(trained_run)!r}, 'flow']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ('bdvae: error: the flow sampler needs zuko, which is not installed: '
                             "pip install 'bdvae[flow]' (or pip install zuko)\n")
    assert sorted(p.name for p in trained_run.rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["evaluate", "{run}", "--samplers", "prior,maf"], "unknown sampler 'maf'"),
    (["sample", "{run}", "--sampler", "gmm-0", "--out", "{tmp}/s.png"], "--components must be positive"),
    (["sampler", "fit", "{run}", "prior"], "needs no fitting"),
    (["sampler", "fit", "{run}", "two_stage", "--components", "3"], "--components is for gmm"),
    (["sampler", "fit", "{run}", "flow", "--regularizer", "kl"], "--regularizer for two_stage, not flow"),
    (["sampler", "fit", "{run}", "gmm", "--fit-on", "mode"], "invalid choice"),
    (["sampler", "fit", "{run}", "gmm-20", "--components", "5"], "name another sampler, gmm-5"),
    (["sampler", "list", "{tmp}"], "not a finished run"),
])
def test_bad_sampler_arguments_are_one_line(trained_run, tmp_path, args, message):
    before = sorted(p.name for p in trained_run.rglob("*"))
    result = run_cli(*(a.format(run=trained_run, tmp=tmp_path) for a in args))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert sorted(p.name for p in trained_run.rglob("*")) == before


@pytest.mark.slow
def test_compare_scores_and_reports_every_sampler(mnist_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--regularizers", "bhattacharyya", "--seeds", "1", "--epochs", "1", "--out", str(out),
            "--data-dir", str(mnist_dir), "--set", "data.train_size=512", "--set", "train.batch_size=64",
            "-k", "2", "--samples", "300", "--test-size", "300", "--samplers", "gmm-2", "--quiet"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    md = (out / "report.md").read_text()
    assert "## Samplers" in md and "| bhattacharyya | 1 | prior | 1 |" in md and "| bhattacharyya | 1 | gmm-2 | 1 |" in md
    assert "runs/bhattacharyya-beta1-seed0/eval/samples-gmm-2.png" in md
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 + 4 + 2  # the plot, 4 pictures, 2 samplers' samples
    assert "missing" not in page and '<div class="scroll"><table>' in page
    again = run_cli(*args)
    assert again.returncode == 0 and "evaluating" not in again.stdout  # same options, same fits: reused
    run_dir = out / "runs" / "bhattacharyya-beta1-seed0"
    refit = run_cli("sampler", "fit", str(run_dir), "gmm-2", "--seed", "1", "--overwrite")
    assert refit.returncode == 0, refit.stderr
    third = run_cli(*args)
    assert third.returncode == 0 and "evaluating" in third.stdout  # another fit: scored again
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["samplers"]["gmm-2"]["fit"]["fit"]["seed"] == 1
