"""The reference MNIST classifier: reproducible training, the shipped weights, and the scale of
the sample-quality scores on reference sets (a set against itself, blurred, noise)."""

from __future__ import annotations

import pytest
import torch

from bdvae import classifier as clf
from bdvae import metrics
from bdvae.config import DataConfig
from bdvae.data import load_dataset
from bdvae.errors import BdvaeError
from bdvae.classifier import blurred, reference_scores
from bdvae.likelihoods import to_float


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_dataset(DataConfig(data_dir=str(mnist_dir)), log=lambda _: None)


@pytest.mark.slow
def test_training_is_reproducible_and_depends_on_the_seed(mnist):
    x, y = mnist.train_images[:1024], mnist.train_labels[:1024]
    before = torch.randn(3)  # the global RNG must not be consumed or reseeded by training
    torch.manual_seed(123)
    a = clf.train_classifier(x, y, epochs=1, seed=5, batch_size=256)
    after_a = torch.randn(3)
    b = clf.train_classifier(x, y, epochs=1, seed=5, batch_size=256)
    c = clf.train_classifier(x, y, epochs=1, seed=6, batch_size=256)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    torch.manual_seed(123)
    assert torch.equal(torch.randn(3), after_a) and not torch.equal(before, after_a)


@pytest.mark.slow
def test_shipped_weights_reach_99_percent_on_the_test_set(mnist):
    model = clf.load_classifier()
    assert clf.accuracy(model, mnist.test_images, mnist.test_labels) >= 0.99
    facts = clf.classifier_facts()
    assert facts["seed"] == 0 and facts["test_accuracy"] >= 0.99


def test_save_load_round_trip_and_a_foreign_file_is_refused(tmp_path):
    model = clf.Classifier()
    clf.save_classifier(model, tmp_path / "c.safetensors", {"seed": 1})
    again = clf.load_classifier(tmp_path / "c.safetensors")
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(again(x), model.eval()(x))
    assert clf.classifier_facts(tmp_path / "c.safetensors") == {"seed": 1}
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BdvaeError, match="junk.safetensors: not a bdvae MNIST classifier"):
        clf.load_classifier(tmp_path / "junk.safetensors")


@pytest.mark.slow
def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_blur(mnist):
    model = clf.load_classifier()
    test = to_float(mnist.test_images[:3000])
    feats = {s: clf.features_and_logits(model, blurred(test, s) if s else test)[0] for s in (0, 0.5, 1.0, 2.0)}
    assert abs(metrics.frechet_distance(feats[0], feats[0])) < 1e-6 * feats[0].square().sum(1).mean().item()
    distances = [metrics.frechet_distance(feats[0], feats[s]) for s in (0.5, 1.0, 2.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


@pytest.mark.slow
def test_reference_scores_order_real_blurred_and_noise(mnist):
    scores = reference_scores(mnist)
    halves, blur1, noise = (scores[k] for k in ("test half vs other half (5000 each)", "test blurred, sigma 1 px", "uniform noise"))
    assert halves["frechet_distance"] < blur1["frechet_distance"] < noise["frechet_distance"]
    assert halves["classifier_score"] > 9.5 and noise["classifier_score"] < 2  # at most 10
    assert halves["recall"] > 0.5 and noise["precision"] < 0.1 and noise["recall"] < 0.01
    assert halves["class_entropy"] > 2.29  # ln 10 = 2.303: MNIST's classes are nearly balanced
    # Real data against real data, 10,000 against 10,000, sits far below the mildest blur: the scale
    # separates samples as good as the data from softened data (issue: below 1% of sigma = 1 px).
    train = scores["10,000 training images"]
    assert train["frechet_distance"] < 0.01 * blur1["frechet_distance"], (train, blur1)
    assert train["recall"] > halves["recall"] and train["precision"] > 0.8
