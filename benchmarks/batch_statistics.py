"""A trained run's test posteriors under three sets of BatchNorm statistics: the running averages
that evaluation uses, each batch of 128 test images' own (as in training), and averages recomputed
over the whole training set after training ("precise BN"). Prints each one's KL and BD per image
and the Bhattacharyya distance of the test set's moment-matched aggregate N(m, S) to N(0, I): where
these move with the statistics, the model leans on what a training batch's statistics do for it,
which the figures of `bdvae evaluate` do not see (docs/results/prior-hole.md).

    python benchmarks/batch_statistics.py RUN_DIR [--json out.json]

About 20 s for the quality preset's model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from bdvae.api import load_run
from bdvae.data import load_dataset
from bdvae.likelihoods import LIKELIHOODS, to_float
from bdvae.metrics import gaussian_bd, mixture_moments
from bdvae.regularizers import REGULARIZERS

BATCH = 128  # the training batch of every preset


def norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def posteriors(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    out = [model.encode(x[i: i + BATCH]) for i in range(0, len(x), BATCH)]
    return torch.cat([mu for mu, _ in out]).double(), torch.cat([lv for _, lv in out]).double()


def figures(model: nn.Module, x: Tensor) -> dict[str, float]:
    mu, logvar = posteriors(model, x)
    return {"kl": REGULARIZERS["kl"](mu, logvar).mean().item(),
            "bd": REGULARIZERS["bhattacharyya"](mu, logvar).mean().item(),
            "aggregate_bd": gaussian_bd(*mixture_moments(mu, logvar)).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run = load_run(args.run)
    if not norms(run.model):
        raise SystemExit(f"{args.run}: the model has no BatchNorm")
    data = load_dataset(run.config.data)
    targets = LIKELIHOODS[run.config.objective.likelihood].targets
    gen = torch.Generator().manual_seed(0)
    test, train = targets(to_float(data.test_images), gen), targets(to_float(data.train_images), gen)

    running = run.model.eval()
    own = copy.deepcopy(running)
    for bn in norms(own):  # each batch's own statistics, the running ones left as they are
        bn.train()
        bn.momentum = 0.0
    recomputed = copy.deepcopy(running).train()
    for bn in norms(recomputed):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch seen
    with torch.no_grad():
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), BATCH):
            recomputed.encode(train[order[i: i + BATCH]])
    recomputed.eval()

    rows = {"running averages (evaluation)": figures(running, test),
            f"each batch of {BATCH}'s own (training)": figures(own, test),
            "recomputed over the training set": figures(recomputed, test)}
    print(f"{args.run}: {len(test):,} test images")
    print(f"{'BatchNorm statistics':40s} {'KL':>8s} {'BD':>8s} {'aggregate BD':>13s}")
    for name, row in rows.items():
        print(f"{name:40s} {row['kl']:8.2f} {row['bd']:8.2f} {row['aggregate_bd']:13.4f}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
