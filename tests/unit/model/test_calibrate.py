"""Calibration: temperatures are recovered, thresholds meet their targets, impossible targets are explained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from splitexit import (
    CalibrationError,
    ConfigError,
    EarlyExitNet,
    build_model,
    calibrate,
)
from splitexit.model.calibrate import _ThresholdSearch, fit_temperature


def test_fit_temperature_recovers_the_scale_of_overconfident_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    fitted = fit_temperature(true_logits * 3.0, labels)
    assert 2.6 < fitted < 3.4


def _search(seed: int = 0) -> _ThresholdSearch:
    """Two early exits: the first right 80% of the time, the second 90%, the final 95%; confidence tracks it."""
    rng = np.random.default_rng(seed)
    n = 2000
    correct = np.stack([rng.random(n) < p for p in (0.8, 0.9, 0.95)])
    scores = np.stack([np.clip(c * 0.5 + rng.random(n) * 0.6, 0, 1) for c in correct[:2]])
    return _ThresholdSearch(scores, correct, np.array([0.3, 0.6, 1.0]))


def test_max_drop_is_met_and_saves_compute() -> None:
    search = _search()
    final = float(search.correct[-1].mean())
    thresholds = search.cheapest(min_accuracy=final - 0.02)
    accuracy, compute = search.evaluate(thresholds)
    assert accuracy >= final - 0.02
    assert compute < 1.0


def test_budget_is_met_and_is_the_most_accurate_shared_choice_or_better() -> None:
    search = _search()
    thresholds = search.most_accurate(max_compute=0.6)
    accuracy, compute = search.evaluate(thresholds)
    assert compute <= 0.6 + 1e-9
    shared = [search.evaluate([t, t]) for t in np.linspace(0, 1, 101)]
    best_shared = max(a for a, c in shared if c <= 0.6)
    assert accuracy >= best_shared - 1e-12


def test_unreachable_budget_names_the_floor() -> None:
    with pytest.raises(CalibrationError, match="0.300"):
        _search().most_accurate(max_compute=0.1)


def test_calibrate_needs_exactly_one_target() -> None:
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8))
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate(net, data)
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate(net, data, max_drop=0.01, budget=0.5)


def test_calibrate_installs_a_policy_with_fitted_temperatures() -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8)).eval()
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    report = calibrate(net, data, budget=0.9)
    assert net.policy is report.policy
    assert len(report.policy.thresholds) == len(net.exit_cuts)
    assert report.compute_fraction <= 0.9 + 1e-9


def test_a_model_at_chance_level_is_called_out_and_a_learnt_one_is_not() -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8)).eval()
    x = torch.randn(200, 1, 8, 8)
    noise = calibrate(net, TensorDataset(x, torch.randint(0, 10, (200,))), budget=0.9)
    assert noise.warning is not None and "chance level" in noise.warning and "--epochs" in noise.warning
    assert noise.as_metadata()["warning"] == noise.warning
    with torch.no_grad():
        own = net(x)[-1].argmax(1)  # labels the model gets right: it has "learnt" them
    learnt = calibrate(net, TensorDataset(x, own), budget=0.9)
    assert learnt.warning is None and "warning" not in learnt.as_metadata()
