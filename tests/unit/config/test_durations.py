"""Durations in cluster files need their unit (``latency: 10`` is refused); from Python a number is seconds;
what splitexit writes reads back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from splitexit.config import BatchingSpec, ClusterSpec, EtcdSpec, LinkChange, LinkSpec, RetryPolicy
from splitexit.config.load import load_cluster
from splitexit.errors import ClusterError
from splitexit.units import format_duration, parse_duration

NODES = {"nodes": [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": "127.0.0.1:50061"}]}


def write(tmp_path: Path, extra: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**NODES, **extra}))
    return path


@pytest.mark.parametrize("text", [10, 0.5, "10", " 7 ", 1e-3])
def test_a_bare_number_is_refused_where_a_unit_is_needed(text: str | float) -> None:
    shown = str(text).strip()
    with pytest.raises(ValueError, match=f"give a unit: {shown}ms or {shown}s"):
        parse_duration(text, need_unit=True)


@pytest.mark.parametrize("text, seconds", [(0, 0.0), ("0", 0.0), (0.0, 0.0), ("10ms", 0.01), ("2s", 2.0)])
def test_zero_and_numbers_with_units_need_nothing_more(text: str | float, seconds: float) -> None:
    assert parse_duration(text, need_unit=True) == pytest.approx(seconds)


def test_a_boolean_is_no_duration() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(True)


@pytest.mark.parametrize("extra, where, number", [
    ({"links": [{"from": "edge", "to": "cloud1", "latency": 10}]}, "links.0.latency", "10"),
    ({"links": [{"from": "edge", "to": "cloud1", "jitter": 2}]}, "links.0.jitter", "2"),
    ({"links": [{"from": "edge", "to": "cloud1", "changes": [{"at": 5}]}]}, "links.0.changes.0.at", "5"),
    ({"links": [{"from": "edge", "to": "cloud1", "changes": [{"at": "5s", "latency": 0.2}]}]},
     "links.0.changes.0.latency", "0.2"),
    ({"batching": {"max_wait": 2}}, "batching.max_wait", "2"),
    ({"retry": {"first_wait": "20ms", "timeout": 60}}, "retry.timeout", "60"),
    ({"retry": {"attempt_timeout": "10"}}, "retry.attempt_timeout", "10"),
])
def test_the_file_names_itself_and_the_key_of_a_bare_duration(tmp_path: Path, extra: dict, where: str,
                                                               number: str) -> None:
    path = write(tmp_path, extra)
    with pytest.raises(ClusterError) as info:
        load_cluster(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and where in message
    assert f"give a unit: {number}ms or {number}s" in message and "Value error" not in message


def test_zero_and_units_load_from_a_file(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, {"links": [{"from": "edge", "to": "cloud1", "latency": 0, "jitter": "1ms"}],
                                            "batching": {"max_wait": 0}, "retry": {"timeout": "2s"},
                                            "registry": {"etcd": ["127.0.0.1:2379"], "ttl": 5}}))
    assert cluster.links[0].latency == 0 and cluster.links[0].jitter == pytest.approx(0.001)
    assert cluster.batching.max_wait == 0 and cluster.retry.timeout == 2.0
    assert isinstance(cluster.registry, EtcdSpec) and cluster.registry.ttl == 5  # etcd's unit: seconds


def test_python_callers_keep_passing_seconds() -> None:
    """How src/ and tests/ build these models: keyword floats, dicts of floats (``ClusterSpec.link`` in series)."""
    assert BatchingSpec(max_batch=4, max_wait=0.001).max_wait == 0.001
    link = LinkSpec.model_validate({"from": "a", "to": "b", "latency": 0.01, "jitter": 0.002,
                                    "changes": [{"at": 5, "latency": 0.02}]})
    assert (link.latency, link.jitter, link.changes[0].at) == (0.01, 0.002, 5.0)
    assert RetryPolicy(first_wait=0.5, timeout=3).timeout == 3.0
    assert LinkChange(at=1.5).at == 1.5
    assert EtcdSpec.model_validate({"etcd": ["a:1"], "ttl": "4s"}).ttl == 4.0


def test_what_splitexit_writes_loads_back_under_the_file_rule(tmp_path: Path) -> None:
    """`plan --write` dumps a ClusterSpec built from floats: its durations carry units, with the same values."""
    built = ClusterSpec.model_validate({**NODES, "links": [{"from": "edge", "to": "cloud1", "latency": 0.0035,
                                                            "changes": [{"at": 30, "latency": 0.25}]}],
                                        "batching": {"max_wait": 0.002}, "retry": {"first_wait": 0.02}})
    data = built.model_dump(mode="json", by_alias=True)
    assert data["links"][0]["latency"] == "3.5ms" and data["batching"]["max_wait"] == "2ms"
    assert data["retry"] == {"first_wait": "20ms", "max_wait": "1s", "timeout": "60s", "attempt_timeout": "10s"}
    path = tmp_path / "written.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_cluster(path, read_secrets=False) == built
    assert built.model_dump()["batching"]["max_wait"] == 0.002  # Python mode: still seconds as a float


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_a_written_duration_reads_back_exactly(seconds: float) -> None:
    text = format_duration(seconds)
    assert parse_duration(text, need_unit=True) == seconds
    assert text.endswith(("us", "ms", "s"))


@pytest.mark.parametrize("seconds, text", [(0.0, "0s"), (0.002, "2ms"), (1.0, "1s"), (60.0, "60s"),
                                           (0.0035, "3.5ms"), (2.5e-7, "0.25us")])
def test_durations_are_written_short(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
