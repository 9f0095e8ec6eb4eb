"""`splitexit up` + `splitexit run` as a user runs them, on the digits test split, with real processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from splitexit import load, load_dataset, read_spec, split_dataset
from support import free_port

pytestmark = pytest.mark.slow



def splitexit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "splitexit", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "digits"
    splitexit("train", "--model", "digits_cnn", "--data", "digits", "--out", str(path), "--epochs", "12")
    splitexit("calibrate", str(path), "--max-drop", "0.0")  # the strictest policy sends the most rows on
    return path


def write_cluster(path: Path, package: Path, codec: str) -> Path:
    spec = {"package": str(package),
            "nodes": [{"name": "edge", "role": "edge"},
                      {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                      {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
            "links": [{"from": "edge", "to": "cloud1", "codec": codec, "latency": "1ms"},
                      {"from": "cloud1", "to": "cloud2", "codec": codec}],
            "batching": {"max_batch": 8, "max_wait": "1ms"}}
    path.write_text(yaml.safe_dump(spec))
    return path


def node_pids(cluster_file: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"node --cluster {cluster_file}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def run_through_cluster(tmp_path: Path, package: Path, codec: str) -> list[dict]:
    tag = codec.replace("+", "_")  # file names are matched by pgrep, where + is a regex operator
    cluster_file = write_cluster(tmp_path / f"cluster-{tag}.yaml", package, codec)
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        assert len(node_pids(cluster_file)) == 2
        results, table = tmp_path / f"results-{tag}.jsonl", tmp_path / f"results-{tag}.csv"
        splitexit("run", str(package), "--cluster", str(cluster_file), "--out", str(results), "--no-plan",
                  "--csv", str(table), "--report", str(tmp_path / f"report-{tag}"))  # the file's layout and codec
        report = json.loads((tmp_path / f"report-{tag}" / "report.json").read_text())
        assert report["metadata"]["cluster file"] == str(cluster_file) and report["metadata"]["model"] == "digits_cnn"
        assert report["metadata"]["placement by"] == "cluster file" and report["metadata"]["splitexit"]
        records = [json.loads(line) for line in results.read_text().splitlines()]
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(int(r["index"]), int(r["prediction"]), r["node"], r["plan"]) for r in rows] == \
            [(r["index"], r["prediction"], r["node"], r["plan"]) for r in records], "the CSV says what the JSON does"
        (plan,) = report["plans"]
        assert isinstance(plan["plan"], str) and {r["plan"] for r in records} == {plan["plan"]}
        assert plan["requests"] == len(records) and plan["predicted_ms"] is None  # not planned: nothing predicted
        return records
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        deadline = time.monotonic() + 10
        while node_pids(cluster_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node_pids(cluster_file) == [], "`splitexit up` left node processes behind"


def test_raw_cluster_answers_every_digits_test_sample_like_net_infer(tmp_path: Path, package: Path) -> None:
    records = run_through_cluster(tmp_path, package, "raw")
    net = load(package)
    test = split_dataset(load_dataset("digits"), read_spec(package).data).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    expected = net.infer(x)
    assert [r["index"] for r in records] == list(range(len(test)))
    assert all(r["error"] is None for r in records)
    assert [r["prediction"] for r in records] == expected.prediction.tolist()
    assert [r["exit"] for r in records] == expected.exit.tolist()
    assert {"index", "prediction", "exit", "node", "label", "latency_ms"} <= set(records[0])


def test_int8_cluster_keeps_accuracy_within_half_a_point(tmp_path: Path, package: Path) -> None:
    raw = run_through_cluster(tmp_path, package, "raw")
    int8 = run_through_cluster(tmp_path, package, "int8+zstd")

    def accuracy(records: list[dict]) -> float:
        return sum(r["prediction"] == r["label"] for r in records) / len(records)
    assert abs(accuracy(int8) - accuracy(raw)) <= 0.005


def test_killing_up_leaves_no_orphan_nodes(tmp_path: Path, package: Path) -> None:
    cluster_file = write_cluster(tmp_path / "cluster-kill.yaml", package, "raw")
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "cluster up" in (up.stdout.readline() if up.stdout else "")
    assert len(node_pids(cluster_file)) == 2
    up.kill()  # SIGKILL: `up` gets no chance to stop its children itself
    up.wait()
    deadline = time.monotonic() + 15
    while node_pids(cluster_file) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node_pids(cluster_file) == [], "nodes outlived a SIGKILLed `splitexit up`"
