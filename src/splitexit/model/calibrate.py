"""Calibrate exits on held-out data: a temperature per exit, then one threshold per early exit.

Temperatures minimise the negative log-likelihood of each exit's logits (temperature scaling, Guo et
al. 2017). Thresholds are then searched on the calibrated confidences by coordinate descent, starting
from the best single shared threshold:

* ``max_drop``: by default with a guarantee (``guarantee.py``): the lowest shared threshold certified, at
  ``guarantee`` (0.95), to keep the drop within ``max_drop`` on new data; with ``guarantee=None`` the
  cheapest thresholds whose accuracy on the calibration split itself stays within ``max_drop`` (a point
  estimate, which new data can miss);
* ``budget``: the most accurate thresholds whose mean compute (heads included) stays within ``budget``
  times the full model's FLOPs.

The search runs on the calibration split only, never on test data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from splitexit.config import NEVER, ExitPolicy
from splitexit.errors import CalibrationError, ConfigError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.guarantee import Certified, cascade_exits, certify
from splitexit.model.heads import confidence_function

__all__ = ["DEFAULT_GUARANTEE", "CalibrationReport", "ExitOutputs", "calibrate", "collect_outputs",
           "fit_temperature"]

#: The probability a --max-drop promise holds with, unless the caller asks for none.
DEFAULT_GUARANTEE = 0.95

#: Temperatures are searched on this log-spaced grid (wide enough for badly over-confident heads).
TEMPERATURE_GRID = np.geomspace(0.05, 20.0, 400)
#: Candidate thresholds per exit: these quantiles of that exit's confidences (plus "never").
THRESHOLD_QUANTILES = np.linspace(0.0, 1.0, 201)
MAX_ROUNDS = 20
#: A final exit no better than this many times chance (1 / classes) has learnt nothing worth calibrating.
CHANCE_FACTOR = 1.5
EVAL_BATCH = 256


@dataclass
class ExitOutputs:
    """Every exit's logits on a dataset, with the labels."""

    logits: list[torch.Tensor]
    labels: torch.Tensor

    def accuracy(self) -> tuple[float, ...]:
        """Each exit's accuracy on its own (every sample scored there), the final exit last."""
        return tuple(float((logits.argmax(1) == self.labels).float().mean()) for logits in self.logits)


@dataclass
class CalibrationReport:
    policy: ExitPolicy
    exit_names: list[str]
    mode: str  # "max_drop" or "budget"
    target: float
    final_exit_accuracy: float
    accuracy: float
    compute_fraction: float
    samples: int
    warning: str | None = None  # something the user should know before trusting these thresholds
    guarantee: float | None = None  # the level the max_drop promise holds with (None: a point estimate)
    bound: float | None = None  # with a guarantee: the certified bound on the introduced-error rate

    def as_metadata(self) -> dict[str, float | int | str]:
        return {"mode": self.mode, "target": self.target, "samples": self.samples,
                "calib_accuracy": round(self.accuracy, 6),
                "calib_final_exit_accuracy": round(self.final_exit_accuracy, 6),
                "calib_compute_fraction": round(self.compute_fraction, 6),
                **({"guarantee": self.guarantee} if self.guarantee is not None else {}),
                **({"bound": round(self.bound, 6)} if self.bound is not None else {}),
                **({"warning": self.warning} if self.warning else {})}


def collect_outputs(net: EarlyExitNet, dataset: Dataset, batch_size: int = EVAL_BATCH) -> ExitOutputs:
    """Run every exit on every sample (eval mode, no gradients)."""
    net.eval()
    per_exit: list[list[torch.Tensor]] = [[] for _ in range(net.num_exits)]
    labels = []
    with torch.inference_mode():
        for inputs, targets in DataLoader(dataset, batch_size=batch_size):
            for store, logits in zip(per_exit, net(inputs)):
                store.append(logits.float())
            labels.append(torch.as_tensor(targets))
    if not labels:
        raise CalibrationError("the calibration split is empty; use a larger dataset")
    return ExitOutputs([torch.cat(chunks) for chunks in per_exit], torch.cat(labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature on TEMPERATURE_GRID that minimises cross-entropy of ``logits / T``."""
    losses = [float(F.cross_entropy(logits / t, labels)) for t in TEMPERATURE_GRID]
    return float(TEMPERATURE_GRID[int(np.argmin(losses))])


def calibrate(net: EarlyExitNet, dataset: Dataset, *, max_drop: float | None = None,
              budget: float | None = None, confidence: str | None = None,
              guarantee: float | None = DEFAULT_GUARANTEE) -> CalibrationReport:
    """Fit temperatures and thresholds on ``dataset`` and install the resulting policy in ``net``.

    ``guarantee`` is the level of the ``max_drop`` promise (None: the point estimate); it has no effect with
    ``budget``, which promises compute, not accuracy."""
    if (max_drop is None) == (budget is None):
        raise ConfigError("give exactly one of --max-drop (accuracy you may lose, e.g. 0.01) or --budget "
                          "(fraction of the full model's compute, e.g. 0.5)")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise ConfigError(f"--max-drop is a fraction of accuracy in [0, 1), got {max_drop}")
    if budget is not None and not 0 < budget:
        raise ConfigError(f"--budget is a positive fraction of the full model's FLOPs, got {budget}")
    outputs = collect_outputs(net, dataset)
    name = confidence or net.policy.confidence
    score = confidence_function(name)
    raw_early = max_drop is not None and guarantee is not None  # a certified family is fixed before the data
    temperatures = [1.0 if raw_early and i < len(outputs.logits) - 1 else fit_temperature(logits, outputs.labels)
                    for i, logits in enumerate(outputs.logits)]
    with torch.no_grad():
        scores = np.stack([score(logits / t).numpy() for logits, t in zip(outputs.logits[:-1], temperatures)]) \
            if net.exit_cuts else np.zeros((0, len(outputs.labels)))
    correct = np.stack([(logits.argmax(1) == outputs.labels).numpy() for logits in outputs.logits])
    costs = np.array(net.exit_costs(), dtype=np.float64) / net.total_flops
    search = _ThresholdSearch(scores, correct, costs)
    final_accuracy = float(correct[-1].mean())
    warning = chance_warning(final_accuracy, net.num_classes)
    promise: Certified | None = None
    if max_drop is not None and guarantee is not None:
        promise = certify(scores, correct, max_drop=max_drop, level=guarantee)
        thresholds = [NEVER if promise.threshold is None else promise.threshold] * search.early
        mode, target = "max_drop", max_drop
        warning = warning or _uncertified_warning(promise, max_drop, guarantee)
    elif max_drop is not None:
        thresholds = search.cheapest(min_accuracy=final_accuracy - max_drop)
        mode, target = "max_drop", max_drop
    else:
        assert budget is not None  # exactly one of the two is set, checked above
        thresholds = search.most_accurate(max_compute=budget)
        mode, target = "budget", budget
    accuracy, compute = search.evaluate(thresholds)
    policy = ExitPolicy(confidence=name, temperatures=tuple(temperatures), thresholds=tuple(thresholds))
    net.set_policy(policy)
    return CalibrationReport(policy, net.exit_names(), mode, float(target), final_accuracy, accuracy, compute,
                             len(outputs.labels), warning=warning, guarantee=guarantee if promise else None,
                             bound=promise.bound if promise and promise.threshold is not None else None)


def _uncertified_warning(promise: Certified, max_drop: float, level: float) -> str | None:
    if promise.threshold is not None or not promise.samples:
        return None
    return (f"no early exit could be certified to lose at most {max_drop:.2%} with {level:.0%} confidence on "
            f"{promise.samples} calibration samples (the least they can certify is {promise.smallest_promise:.2%}), "
            "so every sample runs to the final exit. Calibrate on more samples, allow a larger --max-drop, or use "
            "--guarantee none for the point estimate (no promise).")


def chance_warning(final_accuracy: float, classes: int) -> str | None:
    """Say so when the model itself is at chance level: thresholds are then fitted to noise."""
    if classes < 2 or final_accuracy > CHANCE_FACTOR / classes:
        return None
    return (f"the final exit is at chance level ({final_accuracy:.1%} with {classes} classes): the model has not "
            "learnt the task, so these thresholds mean nothing. Train longer (--epochs), check the data and labels, "
            "or load pretrained weights (--weights), then calibrate again.")


class _ThresholdSearch:
    """Simulates the cascade on stored confidences for any thresholds, and searches thresholds."""

    def __init__(self, scores: np.ndarray, correct: np.ndarray, costs: np.ndarray):
        self.scores, self.correct, self.costs = scores, correct, costs
        self.early = scores.shape[0]
        self.candidates = [np.unique(np.append(np.quantile(s, THRESHOLD_QUANTILES), NEVER)) for s in scores]

    def evaluate(self, thresholds: list[float]) -> tuple[float, float]:
        """(accuracy, mean compute fraction) of the cascade with these thresholds."""
        n = self.correct.shape[1]
        exit_at = cascade_exits(self.scores, thresholds)
        rows = np.arange(n)
        return float(self.correct[exit_at, rows].mean()), float(self.costs[exit_at].mean())

    def cheapest(self, *, min_accuracy: float) -> list[float]:
        def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
            return a[0] >= min_accuracy - 1e-12 and (a[1], -a[0]) < (b[1], -b[0])
        return self._descend(better, feasible=lambda r: r[0] >= min_accuracy - 1e-12, goal="accuracy")

    def most_accurate(self, *, max_compute: float) -> list[float]:
        def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
            return a[1] <= max_compute + 1e-12 and (-a[0], a[1]) < (-b[0], b[1])
        thresholds = self._descend(better, feasible=lambda r: r[1] <= max_compute + 1e-12, goal="budget")
        return thresholds

    def _descend(self, better, *, feasible, goal: str) -> list[float]:  # noqa: ANN001 - local predicates
        shared = sorted({float(c) for cands in self.candidates for c in cands})
        best_thresholds: list[float] | None = None
        best_result = (-math.inf, math.inf)
        for t in shared:
            result = self.evaluate([t] * self.early)
            if feasible(result) and (best_thresholds is None or better(result, best_result)):
                best_thresholds, best_result = [t] * self.early, result
        if best_thresholds is None:
            floor = self.evaluate([0.0] * self.early)[1]
            raise CalibrationError(
                f"no thresholds meet the {goal} target: the cheapest cascade (every sample leaving at the first "
                f"exit) costs {floor:.3f} of the full model. Raise --budget above {floor:.3f}, or place the "
                "first exit earlier." if goal == "budget" else
                f"no thresholds meet the {goal} target on the calibration split.")
        for _ in range(MAX_ROUNDS):
            improved = False
            for i in range(self.early):
                for candidate in self.candidates[i]:
                    trial = list(best_thresholds)
                    trial[i] = float(candidate)
                    result = self.evaluate(trial)
                    if better(result, best_result):
                        best_thresholds, best_result, improved = trial, result, True
            if not improved:
                break
        return best_thresholds
