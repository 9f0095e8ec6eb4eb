"""Calibration with a guarantee: on a population whose introduced-error rate is known for every threshold, the
certified threshold is unsafe in at most 1 - level of calibration draws; impossible promises are explained."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from splitexit import EarlyExitNet, build_model, calibrate
from splitexit.cli_options import guarantee_flag
from splitexit.errors import ConfigError
from splitexit.model.guarantee import certify, upper_bound

LEVEL = 0.95


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One early exit whose score is its chance of being right (score ~ U(0, 1)); the final exit is always
    right. Leaving at threshold t then introduces errors at the rate (1 - t)^2 / 2."""
    score = rng.random(n)
    early_right = rng.random(n) < score
    return score[None, :], np.stack([early_right, np.ones(n, dtype=bool)])


def test_the_certified_threshold_is_unsafe_in_at_most_one_draw_in_twenty() -> None:
    rng = np.random.default_rng(0)
    max_drop, draws = 0.02, 300
    safe = 1 - math.sqrt(2 * max_drop)  # the lowest threshold whose population rate is within max_drop
    chosen = [certify(*draw(rng, 400), max_drop=max_drop, level=LEVEL).threshold for _ in range(draws)]
    assert all(t is not None for t in chosen), "400 samples can certify a 2% promise here"
    unsafe = sum(t < safe for t in chosen if t is not None) / draws
    assert unsafe <= 1 - LEVEL + 3 * math.sqrt(LEVEL * (1 - LEVEL) / draws), unsafe
    assert np.median([t for t in chosen if t is not None]) < safe + 0.1, "and it is not needlessly cautious"


def test_the_bound_is_clopper_pearson_and_covers_the_observed_rate() -> None:
    assert upper_bound(0, 359, LEVEL) == pytest.approx(1 - (1 - LEVEL) ** (1 / 359))
    assert 3 / 100 < upper_bound(3, 100, LEVEL) < 0.08
    assert upper_bound(5, 5, LEVEL) == 1.0
    result = certify(*draw(np.random.default_rng(1), 1000), max_drop=0.05, level=LEVEL)
    assert result.threshold is not None and result.errors / result.samples <= result.bound <= 0.05


def test_a_promise_the_samples_cannot_back_certifies_nothing_and_says_how_little_they_could() -> None:
    scores, correct = draw(np.random.default_rng(2), 100)
    result = certify(scores, correct, max_drop=0.01, level=LEVEL)  # 0 errors in 100 only shows <= 2.95%
    assert result.threshold is None and result.smallest_promise == pytest.approx(upper_bound(0, 100, LEVEL))
    assert certify(scores, correct, max_drop=0.0, level=LEVEL).threshold is None


def test_scores_outside_0_1_and_bad_levels_are_refused() -> None:
    scores, correct = draw(np.random.default_rng(3), 50)
    with pytest.raises(ConfigError, match=r"scores in \[0, 1\]"):
        certify(scores * 3, correct, max_drop=0.1, level=LEVEL)
    with pytest.raises(ConfigError, match="probability"):
        certify(scores, correct, max_drop=0.1, level=1.0)


def test_calibrate_under_a_guarantee_uses_raw_scores_and_records_the_promise() -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8)).eval()
    x = torch.randn(300, 1, 8, 8)
    with torch.no_grad():
        own = net(x)[-1].argmax(1)  # labels the final exit gets right
    report = calibrate(net, TensorDataset(x, own), max_drop=0.05)
    assert report.guarantee == LEVEL and report.policy.temperatures[:-1] == (1.0,) * len(net.exit_cuts)
    metadata = report.as_metadata()
    assert metadata["guarantee"] == LEVEL
    if report.bound is None:  # nothing certified: said so, and nobody leaves early
        assert report.warning is not None and "no early exit could be certified" in report.warning
        assert all(t == math.inf for t in report.policy.thresholds)
    else:
        assert report.bound <= 0.05 and report.final_exit_accuracy - report.accuracy <= 0.05
    tiny = calibrate(net, TensorDataset(x[:20], own[:20]), max_drop=0.01)
    assert tiny.warning is not None and "the least they can certify is 13.91%" in tiny.warning
    assert "--guarantee none" in tiny.warning
    point = calibrate(net, TensorDataset(x, own), max_drop=0.05, guarantee=None)
    assert point.guarantee is None and "guarantee" not in point.as_metadata()


def test_the_guarantee_flag() -> None:
    assert guarantee_flag(None, default=LEVEL, budget=None) == LEVEL
    assert guarantee_flag(None, default=LEVEL, budget=0.5) is None
    assert guarantee_flag("none", default=LEVEL, budget=None) is None
    assert guarantee_flag("0.9", default=LEVEL, budget=None) == 0.9
    for bad in ("1", "0", "x", "nan"):
        with pytest.raises(ConfigError, match="probability between 0 and 1"):
            guarantee_flag(bad, default=LEVEL, budget=None)
    with pytest.raises(ConfigError, match="not --budget"):
        guarantee_flag("0.9", default=LEVEL, budget=0.5)
