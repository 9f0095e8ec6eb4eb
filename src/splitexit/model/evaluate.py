"""What a calibrated net buys, measured on data: accuracy per exit, exit rates, compute saved.

Exits are taken by the real routing path (:meth:`EarlyExitNet.infer`); the compute fraction counts, for
every sample, the segments it ran and every head it was scored by, over the full model's FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from splitexit.errors import DataError
from splitexit.model.calibrate import EVAL_BATCH, collect_outputs
from splitexit.model.exits import EarlyExitNet

__all__ = ["EvalReport", "ExitStats", "evaluate"]


@dataclass(frozen=True)
class ExitStats:
    exit: int
    location: str  # module or node the exit follows; "final" for the model's own output
    accuracy: float  # this exit's accuracy if every sample were answered here
    exit_rate: float  # fraction of samples that left here
    cumulative_accuracy: float  # accuracy of every sample that left here or earlier
    flops: int  # per-sample FLOPs spent by a sample leaving here (heads included)


@dataclass(frozen=True)
class EvalReport:
    samples: int
    accuracy: float
    final_exit_accuracy: float
    compute_fraction: float
    exit_rates: list[float]
    exits: list[ExitStats]
    model_flops: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate(net: EarlyExitNet, dataset: Dataset, batch_size: int = EVAL_BATCH) -> EvalReport:
    outputs = collect_outputs(net, dataset, batch_size)
    labels = outputs.labels
    predictions, exits = [], []
    for inputs, _ in DataLoader(dataset, batch_size=batch_size):
        result = net.infer(inputs)
        predictions.append(result.prediction)
        exits.append(result.exit)
    prediction, exit_at = torch.cat(predictions), torch.cat(exits)
    samples = len(labels)
    if samples == 0:
        raise DataError("cannot evaluate on an empty split")
    correct = prediction == labels
    costs = net.exit_costs()
    names = net.exit_names()
    alone = outputs.accuracy()
    stats = []
    for i in range(net.num_exits):
        here = exit_at == i
        so_far = exit_at <= i
        stats.append(ExitStats(
            exit=i,
            location=names[i],
            accuracy=alone[i],
            exit_rate=float(here.float().mean()),
            cumulative_accuracy=float(correct[so_far].float().mean()) if so_far.any() else float("nan"),
            flops=costs[i],
        ))
    compute = float(torch.tensor(costs, dtype=torch.float64)[exit_at].mean()) / net.total_flops
    return EvalReport(samples=samples, accuracy=float(correct.float().mean()),
                      final_exit_accuracy=stats[-1].accuracy, compute_fraction=compute,
                      exit_rates=[s.exit_rate for s in stats], exits=stats, model_flops=net.total_flops)

