"""`splitexit profile` (here, and on a running cluster) and `splitexit plan` as a user runs them, on a quickly
trained digits package."""

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

from splitexit import (
    EarlyExitNet,
    build_model,
    calibrate,
    load_dataset,
    save,
    split_dataset,
    train,
)
from splitexit.config import ClusterSpec, DataSplit, ModelSource, TrainConfig
from support import free_port

pytestmark = pytest.mark.slow

CLUSTER = {
    "nodes": [{"name": "edge", "role": "edge", "slowdown": 8},
              {"name": "cloud1", "address": "127.0.0.1:50061"},
              {"name": "cloud2", "address": "127.0.0.1:50062"}],
    "links": [{"from": "edge", "to": "cloud1", "bandwidth": "20Mbit", "latency": "10ms", "codec": "int8+zstd"},
              {"from": "cloud1", "to": "cloud2", "bandwidth": "1Gbit", "latency": "1ms"}],
    "batching": {"max_batch": 8, "max_wait": "2ms"},
}


def splitexit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitexit", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"}, cwd=cwd)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_cnn trained for two epochs and calibrated: exits that really fire, in a few seconds."""
    torch.manual_seed(0)
    splits = split_dataset(load_dataset("digits"))
    net = EarlyExitNet.from_model(build_model("digits_cnn", 10), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10))
    train(net, splits.train, TrainConfig(epochs=2))
    calibrate(net, splits.calib, max_drop=0.02)
    return save(net, tmp_path_factory.mktemp("plan") / "digits", data=DataSplit(dataset="digits"))


@pytest.fixture(scope="module")
def cluster_file(package: Path) -> Path:
    path = package.parent / "cluster.yaml"
    path.write_text(yaml.safe_dump(CLUSTER))
    return path


def test_profile_then_plan_writes_a_servable_cluster_file_and_a_sweep(package: Path, cluster_file: Path,
                                                                     tmp_path: Path) -> None:
    profiled = json.loads(ok(splitexit("profile", str(package), "--json")).stdout)  # this machine only
    assert Path(profiled["profile"]) == package / "profile.json" and (package / "profile.json").is_file()
    assert not profiled["reused_timing"]
    cuts = profiled["cuts"]
    assert len(profiled["timing"]["segments"]) == len(cuts) + 1
    assert {"raw", "int8+zstd"} <= set(profiled["timing"]["transfers"][0]["codecs"])

    planned = tmp_path / "planned.yaml"
    sweep = tmp_path / "sweep.png"
    result = json.loads(ok(splitexit("plan", str(package), "--cluster", str(cluster_file), "--json",
                                     "--write", str(planned), "--sweep-bandwidth", "--sweep-out", str(sweep))).stdout)
    assert result["profile_reused"], "plan reuses the profile measured above"
    best, edge, cloud = result["best"], result["edge_only"], result["cloud_only"]
    assert best["latency_ms"] <= min(edge["latency_ms"], cloud["latency_ms"]) + 1e-9
    assert [s["nodes"] for s in edge["stages"]] == [["edge"]]
    assert [s["nodes"] for s in cloud["stages"]] == [["cloud2"]] and cloud["links"][0]["cut"] == "input"
    assert result["speedup"]["cloud_only"] >= 1.0
    assert 0.5 < best["accuracy"] <= 1.0 and abs(sum(best["exit_rates"]) - 1) < 1e-9
    latencies = [c["latency_ms"] for c in result["candidates"]]
    assert latencies == sorted(latencies) and len(latencies) == 5

    served = ClusterSpec.model_validate(yaml.safe_load(planned.read_text()))
    assert Path(served.package or "") == package.resolve()
    computing = [s["nodes"][0] for s in best["stages"]]
    ends = [None if s["end"] == "output" else s["end"] for s in best["stages"]]  # the last tier leaves it unset
    if best["stages"][0]["tier"] != 0:  # a skipped edge stays as the entry, with an empty stage
        computing, ends = ["edge", *computing], ["input", *ends]
    assert [n.name for n in served.nodes] == computing
    assert [n.ends_at for n in served.nodes] == ends
    assert result["sweep"] == str(sweep) and sweep.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_tables_objectives_and_mistakes(package: Path, cluster_file: Path) -> None:
    shown = ok(splitexit("plan", str(package), "--cluster", str(cluster_file), "--objective", "throughput",
                         "--top", "3")).stdout
    for phrase in ("Plans for throughput", "best", "#3", "edge-only", "cloud-only", "inputs/s", "bottleneck"):
        assert phrase in shown, f"{phrase!r} not in:\n{shown}"
    assert "edge[in..out]" in shown, "stage ranges are printed, not eaten as markup"

    missing = splitexit("plan", str(package), "--cluster", str(cluster_file), "--objective", "deadline")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "--deadline 50ms" in missing.stderr

    tight = json.loads(ok(splitexit("plan", str(package), "--cluster", str(cluster_file), "--deadline", "1ms",
                                    "--json")).stdout)
    assert tight["objective"] == "deadline" and tight["best"]["meets_deadline"] is False
    assert tight["best"]["latency_ms"] == min(c["latency_ms"] for c in tight["candidates"])


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
