"""The training loop's pieces: the learning-rate schedule, and a short real training of the quality preset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bdvae import config as config_lib
from bdvae.config import TrainConfig
from bdvae.data import load_dataset
from bdvae.model import build_model
from bdvae.training import evaluate_terms, lr_at, train


def test_constant_schedule_keeps_the_learning_rate():
    assert [lr_at(TrainConfig(lr=3e-3), p) for p in (0.0, 0.4, 0.99)] == [3e-3] * 3


def test_cosine_schedule_falls_from_lr_to_zero_half_way_at_half():
    train_config = TrainConfig(lr=2e-3, lr_schedule="cosine")
    assert lr_at(train_config, 0.0) == pytest.approx(2e-3)
    assert lr_at(train_config, 0.5) == pytest.approx(1e-3)
    assert lr_at(train_config, 0.999) == pytest.approx(0.0, abs=1e-8)
    values = [lr_at(train_config, p / 100) for p in range(100)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing
    assert lr_at(train_config, 0.25) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)))


@pytest.mark.slow
def test_a_short_training_of_the_quality_preset_lowers_the_test_loss(mnist_dir, tmp_path):
    config = config_lib.load(None, ["data.train_size=3000", "data.test_size=500", "train.epochs=2",
                                    "objective.warmup_steps=20", f"data.data_dir={json.dumps(str(mnist_dir))}"],
                             preset="quality")
    data = load_dataset(config.data, log=lambda _: None)
    torch.manual_seed(config.train.seed)  # the initial weights training starts from
    untrained = evaluate_terms(build_model(config.model, config.objective, data.shape), data.test_images, config,
                               seed=config.train.seed)
    run_dir = train(config, tmp_path / "quality", progress=False, log=lambda _: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_loss"] < 0.5 * untrained["loss"]  # the negative ELBO of the binarized test images
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 2
    saved = config_lib.load(run_dir / "config.toml")
    assert saved.model == config.model and saved.train == config.train
