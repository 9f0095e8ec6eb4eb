"""Benchmark: does calibration's accuracy promise hold on data it never saw? Guarantee vs point estimate.

For each case a net is trained once on its train split (60%, seeded); the other 40% is the pool. For each of
``--seeds`` random splits of the pool into calibration and test halves, the net is calibrated on the
calibration half with ``--max-drop D`` twice, with the 95% guarantee (``calibrate --guarantee 0.95``, the
default) and with the point estimate (``--guarantee none``), and evaluated on the test half. A violation is
a test-half drop (final exit's accuracy minus the cascade's) above D. The guarantee promises violations in at
most 5% of splits (it bounds the rate on the population; the test half adds its own sampling noise, which
the bound's margin has so far covered); the point estimate promises nothing beyond its calibration half.

Cases: ``digits_cnn`` on scikit-learn's digits, trained 30 epochs (strong exits) and 4 epochs (weak exits,
which introduce more errors: a harder test), D = 1 point; a 4-layer MLP on scikit-learn's breast-cancer
table (569 samples, 2 classes), D = 5 points (its calibration half of 114 samples cannot certify less than
2.6 points even with no errors).

Run ``.venv/bin/python bench/guarantee.py`` (``make bench``); ``--seeds N`` (default 30), ``--quick`` (10
seeds), ``--json PATH`` to keep the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from splitexit.config import TrainConfig
from splitexit.model.calibrate import DEFAULT_GUARANTEE, calibrate
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.evaluate import evaluate
from splitexit.model.exits import EarlyExitNet
from splitexit.model.train import train
from splitexit.model.zoo import build_model


@dataclass(frozen=True)
class Case:
    name: str
    net: EarlyExitNet
    pool: Dataset
    max_drop: float


def digits_case(epochs: int) -> Case:
    data = load_dataset("digits")
    splits = split_dataset(data)
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn", 10), torch.zeros(1, *data.sample_shape))
    train(net, splits.train, TrainConfig(epochs=epochs))
    pool = torch.utils.data.ConcatDataset([splits.calib, splits.test])
    return Case(f"digits_cnn / digits, {epochs} epochs", net, pool, 0.01)


def breast_cancer_case() -> Case:
    table = load_breast_cancer()
    x = torch.tensor(table.data, dtype=torch.float32)
    y = torch.tensor(table.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.6 * len(y))
    train_rows, pool_rows = order[:cut], order[cut:]
    mean, std = x[train_rows].mean(0), x[train_rows].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 2))
    net = EarlyExitNet.from_model(mlp, torch.zeros(1, 30))
    train(net, TensorDataset(x[train_rows], y[train_rows]), TrainConfig(epochs=30, batch_size=32))
    return Case("MLP / breast cancer", net, TensorDataset(x[pool_rows], y[pool_rows]), 0.05)


def measure(case: Case, seeds: int) -> list[dict[str, object]]:
    rows = []
    n = len(case.pool)  # type: ignore[arg-type]
    for label, level in ((f"guarantee {DEFAULT_GUARANTEE:g}", DEFAULT_GUARANTEE), ("point estimate", None)):
        drops, computes, bounds, uncertified = [], [], [], 0
        for seed in range(seeds):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed)).tolist()
            calib, test = Subset(case.pool, order[:n // 2]), Subset(case.pool, order[n // 2:])
            report = calibrate(case.net, calib, max_drop=case.max_drop, guarantee=level)
            if level is not None:
                if report.bound is None:
                    uncertified += 1
                else:
                    bounds.append(report.bound)
            result = evaluate(case.net, test)
            drops.append(result.final_exit_accuracy - result.accuracy)
            computes.append(result.compute_fraction)
        violations = sum(d > case.max_drop + 1e-9 for d in drops)
        rows.append({"case": case.name, "max_drop": case.max_drop, "mode": label, "seeds": seeds,
                     "calib_samples": n // 2, "violations": violations, "violation_rate": violations / seeds,
                     "mean_drop": statistics.fmean(drops), "worst_drop": max(drops),
                     "mean_compute": statistics.fmean(computes),
                     "mean_bound": statistics.fmean(bounds) if bounds else None, "uncertified": uncertified})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=30, help="random calibration/test splits per case")
    parser.add_argument("--quick", action="store_true", help="10 seeds")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    seeds = 10 if args.quick else args.seeds
    console = Console(width=200)
    started = time.time()
    console.print(f"# bench/guarantee.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
                  f"{torch.__version__}, {seeds} splits per case")
    rows = []
    for make in (lambda: digits_case(30), lambda: digits_case(4), breast_cancer_case):
        rows += measure(make(), seeds)
    table = Table("case", "D", "calibration", "violations", "mean drop", "worst drop", "compute",
                  "certified bound", "nothing certified", title="test-half drop above D, over random splits")
    for row in rows:
        bound = "-" if row["mean_bound"] is None else f"{row['mean_bound']:.2%}"
        table.add_row(str(row["case"]), f"{row['max_drop']:.0%}", str(row["mode"]),
                      f"{row['violations']}/{row['seeds']} ({row['violation_rate']:.0%})", f"{row['mean_drop']:.2%}",
                      f"{row['worst_drop']:.2%}", f"{row['mean_compute']:.1%}", bound,
                      str(row["uncertified"]) if row["mode"] != "point estimate" else "-")
    console.print(table)
    console.print(f"({time.time() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
