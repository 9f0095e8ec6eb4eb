"""The user's path through the model core, one function per CLI command (cuts, train, calibrate, eval).

Each function takes typed settings, does the whole job on files and returns a summary; the CLI only
parses flags and prints what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from splitexit.app.package_data import DEFAULT_SPLIT, package_dataset
from splitexit.config import DataSplit, ModelSource, TrainConfig
from splitexit.errors import ConfigError
from splitexit.model.calibrate import DEFAULT_GUARANTEE, CalibrationReport, calibrate
from splitexit.model.cpu import apply_threads, tune_cpu
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.evaluate import EvalReport, evaluate
from splitexit.model.exits import DEFAULT_AUTO_EXITS, EarlyExitNet
from splitexit.model.graph import ModelGraph, trace_model
from splitexit.model.package import load, load_backbone_weights, read_spec, save
from splitexit.model.train import EpochCallback, TrainReport, train
from splitexit.model.zoo import build_model, default_input_shape

__all__ = ["AUTO", "DEFAULT_CONFIDENCE", "DEFAULT_MAX_DROP", "TrainSummary", "calibrate_package", "default_mode",
           "evaluate_package", "model_cuts", "train_package"]

#: Exits placed by FLOPs, and each exit's head chosen for the tensor it reads.
AUTO = "auto"
#: How an exit scores its confidence unless told otherwise.
DEFAULT_CONFIDENCE = "max_softmax"
#: Accuracy calibration may give up against the final exit when neither a drop nor a budget is asked for.
DEFAULT_MAX_DROP = 0.01


@dataclass(frozen=True)
class TrainSummary:
    package: Path
    net: EarlyExitNet
    report: TrainReport
    train_samples: int
    #: Each exit's accuracy on the held-out calibration split (the final exit last): a falling loss alone
    #: does not say whether the model learnt anything it can use on data it has not seen.
    calib_accuracy: tuple[float, ...]
    calib_samples: int

    @property
    def final_accuracy(self) -> float:
        return self.calib_accuracy[-1]


def model_cuts(model: str, input_shape: tuple[int, ...] | None = None) -> ModelGraph:
    """Trace ``model`` on one input of ``input_shape`` (default: the model's usual input) to list its cuts.

    The model is built first, so that a misspelt name is reported as unknown, not as lacking a shape.
    """
    backbone = build_model(model)
    shape = input_shape or default_input_shape(model)
    if shape is None:
        raise ConfigError(f"pass --input-shape for {model} (e.g. --input-shape 3x224x224)")
    return trace_model(backbone, torch.zeros(1, *shape))


def default_mode(weights: Path | None) -> Literal["heads", "joint"]:
    """Heads only on a pretrained backbone; joint (everything, from scratch) on a random one."""
    return "heads" if weights is not None else "joint"


def train_package(model: str, data: str, out: Path, *, exits: str | Sequence[str] = AUTO,
                  num_exits: int = DEFAULT_AUTO_EXITS, head: str = AUTO, confidence: str = DEFAULT_CONFIDENCE,
                  weights: Path | None = None, config: TrainConfig | None = None,
                  on_epoch: EpochCallback | None = None) -> TrainSummary:
    """Build ``model``, attach exits, train on the train split of ``data``, tune for this CPU, write a package.

    Without ``config`` the mode is :func:`default_mode`.
    """
    dataset = load_dataset(data)
    splits = split_dataset(dataset)
    config = config or TrainConfig(mode=default_mode(weights))
    torch.manual_seed(config.seed)  # before the backbone is built: its initial weights come from this seed too
    backbone = build_model(model, dataset.num_classes)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    example = torch.zeros(1, *dataset.sample_shape)
    net = EarlyExitNet.from_model(backbone, example, exits, num_exits=num_exits, head=head, confidence=confidence,
                                  source=ModelSource(name=model, num_classes=dataset.num_classes))
    report = train(net, splits.train, config, validation=splits.calib, on_epoch=on_epoch)
    threads = torch.get_num_threads()  # what training ran with (tune_cpu below picks the serving count)
    accuracy = report.accuracy[report.kept_epoch - 1]  # of the weights the net keeps, on the calibration split
    tune_cpu(net)
    package = save(net, out, data=DataSplit(dataset=data),
                   training={"mode": config.mode, "epochs": config.epochs, "seed": config.seed,
                             "epochs_run": len(report.losses), "kept_epoch": report.kept_epoch,
                             "threads": threads,
                             "lr": config.lr, "final_loss": round(report.losses[report.kept_epoch - 1], 6),
                             "calib_accuracy": round(accuracy[-1], 6),
                             "weights": str(weights) if weights else None},
                   classes=dataset.class_names, images=dataset.images)
    return TrainSummary(package, net, report, len(splits.train), accuracy, len(splits.calib))


def calibrate_package(package: Path, *, data: str | None = None, max_drop: float | None = None,
                      budget: float | None = None, confidence: str | None = None,
                      guarantee: float | None = DEFAULT_GUARANTEE,
                      trust_models: Sequence[str] = ()) -> CalibrationReport:
    """Fit temperatures and thresholds on the package's calibration split and write them back.

    With neither ``max_drop`` nor ``budget``, the target is ``DEFAULT_MAX_DROP``.
    """
    if max_drop is None and budget is None:
        max_drop = DEFAULT_MAX_DROP
    spec = read_spec(package)
    net = load(package, trust_models=trust_models)
    dataset, split = package_dataset(package, net, spec.data, data, trust_models)
    report = calibrate(net, split_dataset(dataset, split).calib, max_drop=max_drop, budget=budget,
                       confidence=confidence, guarantee=guarantee)
    save(net, package, data=split, training=spec.training, calibration=report.as_metadata(),
         classes=spec.classes, images=spec.images)
    return report


def evaluate_package(package: Path, *, data: str | None = None, split: str = DEFAULT_SPLIT,
                     trust_models: Sequence[str] = ()) -> EvalReport:
    """Accuracy, exit rates and compute fraction of a package on one split of its dataset."""
    spec = read_spec(package)
    net = load(package, trust_models=trust_models)
    apply_threads(net.cpu)
    dataset, data_split = package_dataset(package, net, spec.data, data, trust_models)
    return evaluate(net, split_dataset(dataset, data_split).get(split))
