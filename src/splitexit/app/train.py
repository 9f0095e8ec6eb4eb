"""The user's path through the model core, one function per CLI command (train, calibrate, eval).

Each function takes typed settings, does the whole job on files and returns a summary; the CLI only
parses flags and prints what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from splitexit.config import DataSplit, ModelSource, TrainConfig
from splitexit.errors import DataError
from splitexit.model.calibrate import CalibrationReport, calibrate
from splitexit.model.cpu import apply_threads, tune_cpu
from splitexit.model.data import LoadedDataset, load_dataset, split_dataset
from splitexit.model.evaluate import EvalReport, evaluate
from splitexit.model.exits import DEFAULT_AUTO_EXITS, EarlyExitNet
from splitexit.model.package import load, load_backbone_weights, read_spec, save
from splitexit.model.train import EpochCallback, TrainReport, train
from splitexit.model.zoo import build_model

__all__ = ["TrainSummary", "calibrate_package", "evaluate_package", "train_package"]


@dataclass(frozen=True)
class TrainSummary:
    package: Path
    net: EarlyExitNet
    report: TrainReport
    train_samples: int


def train_package(model: str, data: str, out: Path, *, exits: str | Sequence[str] = "auto",
                  num_exits: int = DEFAULT_AUTO_EXITS, head: str = "auto", confidence: str = "max_softmax",
                  weights: Path | None = None, config: TrainConfig | None = None,
                  on_epoch: EpochCallback | None = None) -> TrainSummary:
    """Build ``model``, attach exits, train on the train split of ``data``, tune for this CPU, write a package.

    Without ``weights`` the backbone is random, so training is joint (from scratch); with them the default
    is heads-only on the frozen backbone.
    """
    dataset = load_dataset(data)
    splits = split_dataset(dataset)
    backbone = build_model(model, dataset.num_classes)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    config = config or TrainConfig(mode="heads" if weights is not None else "joint")
    torch.manual_seed(config.seed)
    example = torch.zeros(1, *dataset.sample_shape)
    net = EarlyExitNet.from_model(backbone, example, exits, num_exits=num_exits, head=head, confidence=confidence,
                                  source=ModelSource(name=model, num_classes=dataset.num_classes))
    report = train(net, splits.train, config, on_epoch=on_epoch)
    tune_cpu(net)
    package = save(net, out, data=DataSplit(dataset=data),
                   training={"mode": config.mode, "epochs": config.epochs, "seed": config.seed,
                             "lr": config.lr, "final_loss": round(report.losses[-1], 6),
                             "weights": str(weights) if weights else None})
    return TrainSummary(package, net, report, len(splits.train))


def calibrate_package(package: Path, *, data: str | None = None, max_drop: float | None = None,
                      budget: float | None = None, confidence: str | None = None) -> CalibrationReport:
    """Fit temperatures and thresholds on the package's calibration split and write them back."""
    spec = read_spec(package)
    net = load(package)
    dataset, split = _dataset_for(spec.data, data, net, package)
    report = calibrate(net, split_dataset(dataset, split).calib, max_drop=max_drop, budget=budget,
                       confidence=confidence)
    save(net, package, data=split, training=spec.training, calibration=report.as_metadata())
    return report


def evaluate_package(package: Path, *, data: str | None = None, split: str = "test") -> EvalReport:
    """Accuracy, exit rates and compute fraction of a package on one split of its dataset."""
    spec = read_spec(package)
    net = load(package)
    apply_threads(net.cpu)
    dataset, data_split = _dataset_for(spec.data, data, net, package)
    return evaluate(net, split_dataset(dataset, data_split).get(split))


def _dataset_for(recorded: DataSplit | None, requested: str | None, net: EarlyExitNet,
                 package: Path) -> tuple[LoadedDataset, DataSplit]:
    """The dataset to use (flag first, then the one recorded at training) and the split to cut it with."""
    name = requested or (recorded.dataset if recorded else None)
    if name is None:
        raise DataError(f"{package} records no dataset; pass --data (e.g. --data digits)")
    dataset = load_dataset(name)
    if dataset.sample_shape != tuple(net.input_shape):
        raise DataError(f"dataset {name!r} gives samples of shape {dataset.sample_shape}, but {package} expects "
                        f"{tuple(net.input_shape)}; pass the dataset the package was trained on.")
    split = DataSplit(dataset=name, seed=recorded.seed, fractions=recorded.fractions) if recorded \
        else DataSplit(dataset=name)
    return dataset, split
