"""`splitexit profile --cluster` against real worker processes: each node times the model, links are probed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, build_model, calibrate, load_dataset, save, split_dataset, train
from splitexit.config import DataSplit, ModelSource, TrainConfig
from support import free_port

pytestmark = pytest.mark.slow


def splitexit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitexit", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    splits = split_dataset(load_dataset("digits"))
    net = EarlyExitNet.from_model(build_model("digits_cnn", 10), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10))
    train(net, splits.train, TrainConfig(epochs=1))
    calibrate(net, splits.calib, max_drop=0.02)
    return save(net, tmp_path_factory.mktemp("profile") / "digits", data=DataSplit(dataset="digits"))


def test_each_node_times_the_model_and_each_link_is_probed_through_the_runtime(package: Path, tmp_path: Path
                                                                               ) -> None:
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge", "slowdown": 4},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "bandwidth": "20Mbit", "latency": "10ms"},
                  {"from": "cloud1", "to": "cloud2", "bandwidth": "100Mbit", "latency": "2ms"}]}))
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        first = json.loads(ok(splitexit("profile", str(package), "--cluster", str(cluster_file), "--json")).stdout)
        again = json.loads(ok(splitexit("profile", str(package), "--cluster", str(cluster_file), "--json")).stdout)
        shown = ok(splitexit("profile", str(package), "--cluster", str(cluster_file))).stdout
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)

    assert sorted(first["measured_now"]) == ["cloud1", "cloud1 → cloud2", "cloud2", "edge → cloud1"]
    assert again["measured_now"] == [], "a second run reuses what the nodes and links measured"
    local = first["timing"]
    for name in ("cloud1", "cloud2"):
        node = first["nodes"][name]
        assert node["measured_on"] == name and node["key"]["machine"]
        assert [(s["start"], s["end"]) for s in node["segments"]] == [(s["start"], s["end"]) for s in local["segments"]]
        assert len(node["heads"]) == len(local["heads"])
        assert all(s["seconds"][b]["median"] > 0 for s in node["segments"] for b in ("1", "8"))
        assert node["transfers"] == local["transfers"], "bytes and codec times are the edge's"

    links = {(link["from"], link["to"]): link for link in first["links"]}
    assert set(links) == {("edge", "cloud1"), ("cloud1", "cloud2")}
    uplink, datacentre = links[("edge", "cloud1")], links[("cloud1", "cloud2")]
    # the emulated latency both ways, plus gRPC on loopback
    assert 0.020 <= uplink["rtt_s"] <= 0.060, uplink
    assert 0.004 <= datacentre["rtt_s"] <= 0.040, datacentre
    assert 0.6 * 20e6 <= uplink["bandwidth_bps"] <= 1.05 * 20e6, uplink
    assert 0.5 * 100e6 <= datacentre["bandwidth_bps"] <= 1.05 * 100e6, datacentre

    for phrase in ("Compute measured on the nodes", "cloud1", "measured", "probe round trip"):
        assert phrase in shown, f"{phrase!r} not in:\n{shown}"

    down = splitexit("profile", str(package), "--cluster", str(cluster_file))
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "splitexit up --cluster" in down.stderr, down.stderr
