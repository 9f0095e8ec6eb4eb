"""PackageSpec and ExitPolicy: what a model.yaml may say, and the messages when it says something wrong."""

from __future__ import annotations

import math

import pytest
import yaml
from pydantic import ValidationError

from splitexit.config import NEVER, PACKAGE_FORMAT, DataSplit, ExitPolicy, InputSpec, PackageSpec

SHA = "0" * 64


def spec(**changes: object) -> dict[str, object]:
    """A valid model.yaml with two early exits, as the dict YAML would give, with ``changes`` applied."""
    raw: dict[str, object] = {
        "model": {"name": "digits_cnn", "num_classes": 10},
        "input": {"shape": [1, 8, 8]},
        "exits": [{"cut": 2, "after": "relu_1"}, {"cut": 5, "after": "relu_2"}],
        "policy": {"temperatures": [1.0, 1.0, 1.0], "thresholds": [0.9, 0.8]},
        "weights_sha256": SHA,
    }
    raw.update(changes)
    return raw


def test_a_valid_spec_gets_the_defaults() -> None:
    parsed = PackageSpec.model_validate(spec())
    assert parsed.format == PACKAGE_FORMAT
    assert parsed.input.dtype == "float32" and parsed.input.shape == (1, 8, 8)
    assert [e.head for e in parsed.exits] == ["auto", "auto"]
    assert parsed.policy.confidence == "max_softmax"
    assert parsed.cpu.memory_format == "contiguous" and parsed.cpu.threads is None
    assert parsed.data is None


@pytest.mark.parametrize("changes, message", [
    ({"policy": {"temperatures": [1.0, 1.0], "thresholds": [0.9]}}, "1 thresholds for 2 exits"),
    ({"exits": [{"cut": 5, "after": "relu_2"}, {"cut": 2, "after": "relu_1"}]}, "distinct and increasing"),
    ({"exits": [{"cut": 2, "after": "relu_1"}, {"cut": 2, "after": "relu_1"}]}, "distinct and increasing"),
    ({"weights_sha256": "abc"}, "weights_sha256"),
    ({"format": "splitexit.package/2"}, "format"),
    ({"input": {"shape": [1, 0, 8]}}, "non-empty and positive"),
    ({"input": {"shape": []}}, "non-empty and positive"),
    ({"input": {"shape": [1, 8, 8], "dtype": "int8"}}, "dtype"),
    ({"exits": [{"cut": -1, "after": "x"}, {"cut": 5, "after": "relu_2"}]}, "cut"),
    ({"model": {"name": "digits_cnn", "num_classes": 1}}, "num_classes"),
    ({"data": {"dataset": "digits", "fractions": [0.5, 0.3, 0.3]}}, "sum to 1"),
    ({"cpu": {"memory_format": "strided"}}, "memory_format"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_specs_are_refused_with_the_field_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PackageSpec.model_validate(spec(**changes))


def test_the_spec_is_frozen() -> None:
    parsed = PackageSpec.model_validate(spec())
    with pytest.raises(ValidationError):
        parsed.weights_sha256 = "1" * 64  # type: ignore[misc]  # the point: frozen models refuse this


def test_never_exit_is_written_as_yaml_infinity() -> None:
    policy = yaml.safe_load("{temperatures: [1, 1, 1], thresholds: [.inf, 0.5]}")
    parsed = PackageSpec.model_validate(spec(policy=policy))
    assert parsed.policy.thresholds == (NEVER, 0.5)


@pytest.mark.parametrize("temperatures, thresholds, message", [
    ((1.0, 1.0), (0.5, 0.5), "2 early-exit thresholds need 3 temperatures"),
    ((1.0, 1.0, 1.0, 1.0), (0.5, 0.5), "need 3 temperatures"),
    ((1.0, 0.0, 1.0), (0.5, 0.5), "positive finite"),
    ((1.0, -2.0, 1.0), (0.5, 0.5), "positive finite"),
    ((1.0, math.inf, 1.0), (0.5, 0.5), "positive finite"),
    ((1.0, 1.0, 1.0), (math.nan, 0.5), "thresholds must be numbers"),
])
def test_exit_policy_checks_its_lengths_and_values(temperatures: tuple[float, ...], thresholds: tuple[float, ...],
                                                   message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExitPolicy(temperatures=temperatures, thresholds=thresholds)


def test_an_uncalibrated_policy_never_exits_early() -> None:
    policy = ExitPolicy.uncalibrated(3, confidence="entropy")
    assert policy.thresholds == (NEVER,) * 3 and policy.temperatures == (1.0,) * 4
    assert policy.confidence == "entropy"
    assert ExitPolicy.uncalibrated(0).thresholds == ()


def test_a_threshold_of_minus_infinity_is_allowed() -> None:
    assert ExitPolicy(temperatures=(1.0, 1.0), thresholds=(-math.inf,)).thresholds == (-math.inf,)


def test_data_split_defaults_and_input_spec_dtypes() -> None:
    split = DataSplit(dataset="digits")
    assert split.seed == 0 and sum(split.fractions) == pytest.approx(1.0)
    assert InputSpec(shape=(3, 4), dtype="bfloat16").dtype == "bfloat16"
