"""Three edges with different uplinks at once, as three `splitexit run --edge NAME` processes, against one
`splitexit up` of replicated workers: each edge gets every answer once, equal to the model in one process.

The camera and the laptop serve the cluster file's layout (`--no-plan`), so their plans are one plan version
on the workers: rows of both edges, numbered from 1 by each, are batched together there. The phone, on the
fastest uplink, lets the planner choose, which gives it a plan of its own. Raw codecs on every link, so the
answers are exact.
"""

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

from splitexit import load, load_dataset, read_spec, split_dataset
from support import free_port

pytestmark = pytest.mark.slow

UPLINKS = {"camera": ("2Mbit", "10ms"), "phone": ("200Mbit", "1ms"), "laptop": ("20Mbit", "3ms")}
PLANNED = {"phone"}
#: Test-split inputs each edge sends (the whole split, 360, is 3 × slower on two cores for no more proof).
INPUTS = 120


def splitexit(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "splitexit", *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def write_cluster(path: Path, package: Path) -> Path:
    workers = [{"name": "cloud1a", "address": f"127.0.0.1:{free_port()}"},
               {"name": "cloud1b", "address": f"127.0.0.1:{free_port()}", "tier": 1},
               {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}]
    links = [{"from": edge, "to": worker, "bandwidth": bandwidth, "latency": latency, "codec": "raw"}
             for edge, (bandwidth, latency) in UPLINKS.items() for worker in ("cloud1a", "cloud1b")]
    links += [{"from": worker, "to": "cloud2", "codec": "raw"} for worker in ("cloud1a", "cloud1b")]
    spec = {"package": str(package), "links": links, "batching": {"max_batch": 8, "max_wait": "2ms"},
            "nodes": [*({"name": edge, "role": "edge", "slowdown": 20} for edge in UPLINKS), *workers]}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_three_edges_with_different_uplinks_share_replicated_workers_and_each_gets_every_answer_once(
        tmp_path: Path) -> None:
    package = tmp_path / "digits"
    splitexit("train", "--model", "digits_cnn", "--data", "digits", "--out", str(package), "--epochs", "4")
    splitexit("calibrate", str(package), "--max-drop", "0.0")  # the strictest policy sends the most rows on
    splitexit("profile", str(package))  # once, before three edges would each measure it at the same time
    cluster_file = write_cluster(tmp_path / "cluster.yaml", package)
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        edges = {}
        for edge in UPLINKS:
            out = tmp_path / f"{edge}.jsonl"
            placement = [] if edge in PLANNED else ["--no-plan"]
            edges[edge] = (out, subprocess.Popen(
                [sys.executable, "-m", "splitexit", "run", str(package), "--cluster", str(cluster_file), "--edge",
                 edge, "--limit", str(INPUTS), "--out", str(out), "--report", str(tmp_path / f"report-{edge}"),
                 *placement], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for edge, (_, process) in edges.items():
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, f"{edge}\n{stdout}\n{stderr}"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)

    net = load(package)
    test = split_dataset(load_dataset("digits"), read_spec(package).data).test
    x = torch.stack([test[i][0] for i in range(INPUTS)])
    expected = net.infer(x)
    plans, nodes = {}, {}
    for edge, (out, _) in edges.items():
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["index"] for r in records] == list(range(INPUTS)), f"{edge}: every input answered once"
        assert all(r["error"] is None for r in records), edge
        assert [r["prediction"] for r in records] == expected.prediction.tolist(), edge
        assert [r["exit"] for r in records] == expected.exit.tolist(), edge
        report = json.loads((tmp_path / f"report-{edge}" / "report.json").read_text())
        plans[edge] = {p["plan"] for p in report["plans"]}
        nodes[edge] = {r["node"] for r in records}
        print(f"{edge}: {report['placement']}; answered by {sorted(nodes[edge])}, {report['throughput']:.0f}/s")
    assert plans["camera"] == plans["laptop"], "the file's layout is one plan version, whichever edge serves it"
    assert plans["phone"].isdisjoint(plans["camera"]), "the planned edge got a plan of its own"
    workers = {"cloud1a", "cloud1b", "cloud2"}
    assert all(nodes[edge] & workers for edge in UPLINKS), f"every edge's rows reached the workers: {nodes}"
