"""A typo in a cluster file or model.yaml is named with the closest known name: keys, and nodes in links."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from splitexit.config import ClusterSpec, PackageSpec, describe_validation_error
from splitexit.config.base import did_you_mean
from splitexit.config.load import load_cluster
from splitexit.errors import ClusterError

NODES = [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": "127.0.0.1:50061"},
         {"name": "cloud2", "address": "127.0.0.1:50062"}]


def problem(model: type[ClusterSpec] | type[PackageSpec], data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return describe_validation_error(info.value)


def test_the_closest_choice_or_nothing() -> None:
    assert did_you_mean("clod1", ["edge", "cloud1", "cloud2"]) == "; did you mean 'cloud1'?"
    assert did_you_mean("zzz", ["edge", "cloud1"]) == ""


@pytest.mark.parametrize("data, where, message", [
    ({"nodes": NODES, "links": [{"from": "edge", "to": "cloud1", "latencyy": "10ms"}]},
     "links.0", "unknown key 'latencyy'; did you mean 'latency'?"),
    ({"nodes": NODES, "batching": {"max_batchs": 4}},
     "batching", "unknown key 'max_batchs'; did you mean 'max_batch'?"),
    ({"nodes": [*NODES[:2], {"name": "cloud2", "adress": "127.0.0.1:50062"}]},
     "nodes.2", "unknown key 'adress'; did you mean 'address'?"),
    ({"nodes": NODES, "windw": 4}, "(top)", "unknown key 'windw'; did you mean 'window'?"),
    ({"nodes": NODES, "registry": {"etcd": ["a:1"], "prefx": "/p/"}}, "registry", "did you mean 'prefix'?"),
    ({"nodes": NODES, "links": [{"from": "edge", "to": "cloud1", "sauce": "x"}]}, "links.0", "unknown key 'sauce' ("),
])
def test_an_unknown_key_in_a_cluster_file_names_the_closest(data: dict, where: str, message: str) -> None:
    text = problem(ClusterSpec, data)
    assert text.startswith(where) and message in text, text


def test_an_unknown_key_lists_the_keys_as_the_file_spells_them() -> None:
    text = problem(ClusterSpec, {"nodes": NODES, "links": [{"from": "edge", "to": "cloud1", "form": "x"}]})
    assert "(known: from, to, bandwidth, latency" in text


def test_an_unknown_key_in_model_yaml_names_the_closest() -> None:
    data = {"model": {"name": "digits_cnn"}, "input": {"shape": [1, 8, 8]}, "exits": [],
            "policy": {"temperatures": [1.0], "thresholds": []}, "weights_sha256": "0" * 64, "calibraton": {}}
    assert "unknown key 'calibraton'; did you mean 'calibration'?" in problem(PackageSpec, data)
    data = {**{k: v for k, v in data.items() if k != "calibraton"}, "policy": {"temperatures": [1.0], "tresholds": []}}
    assert "did you mean 'thresholds'?" in problem(PackageSpec, data)


@pytest.mark.parametrize("link, message", [
    ({"from": "edge", "to": "clod1"}, "`to: clod1` is no node of this file; did you mean 'cloud1'?"),
    ({"from": "egde", "to": "cloud1"}, "`from: egde` is no node of this file; did you mean 'edge'?"),
    ({"from": "edge", "to": "elsewhere"}, "`to: elsewhere` is no node of this file (nodes: edge, cloud1, cloud2)"),
])
def test_a_link_to_an_unknown_node_names_the_closest(tmp_path: Path, link: dict, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": NODES, "links": [link]}))
    with pytest.raises(ClusterError) as info:
        load_cluster(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_a_link_between_known_nodes_keeps_its_own_message() -> None:
    text = problem(ClusterSpec, {"nodes": NODES, "links": [{"from": "cloud2", "to": "cloud1"}]})
    assert "must join a node to one of a later tier" in text and "no node" not in text

