"""The rough edges of issue 15 as a user meets them: each command run as a process, each mistake answered in
one line (exit 1, ``error:``, no traceback) that names the fix, and each surprise replaced by what was meant."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from splitexit.control.local_cluster import free_port
from splitexit.errors import ClusterError
from splitexit.model.zoo import build_model
from support import cli as splitexit
from support import cli_ok as ok
from support import cli_user_error as user_error

NODES = [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": "127.0.0.1:50061"},
         {"name": "cloud2", "address": "127.0.0.1:50062"}]


def cluster_file(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": NODES, **extra}))
    return path


@pytest.mark.parametrize("extra, phrases", [
    ({"links": [{"from": "edge", "to": "cloud1", "latency": 10}]},
     ("links.0.latency", "10 has no unit: give a unit: 10ms or 10s")),
    ({"batching": {"max_wait": 2}}, ("batching.max_wait", "give a unit: 2ms or 2s")),
    ({"links": [{"from": "edge", "to": "clod1", "latency": "10ms"}]},
     ("`to: clod1` is no node of this file; did you mean 'cloud1'?",)),
    ({"links": [{"from": "edge", "to": "cloud1", "latencyy": "10ms"}]},
     ("links.0", "unknown key 'latencyy'; did you mean 'latency'?")),
])
def test_a_cluster_file_mistake_is_one_line_naming_the_file_and_the_key(tmp_path: Path, extra: dict,
                                                                        phrases: tuple[str, ...]) -> None:
    path = cluster_file(tmp_path, **extra)
    user_error(splitexit("up", "--cluster", str(path)), str(path), *phrases)
    assert not (tmp_path / "cluster.token").exists()  # refused before anything was written


def test_cuts_with_a_misspelt_model_says_unknown_and_suggests_the_name() -> None:
    line = user_error(splitexit("cuts", "--model", "mobilenet_v3_smal"),
                      "unknown model 'mobilenet_v3_smal'; did you mean 'mobilenet_v3_small'?")
    assert "--input-shape" not in line


def test_train_with_weights_of_another_model_names_the_keys_and_shapes(tmp_path: Path) -> None:
    state = build_model("digits_cnn", 5).state_dict()  # the digits dataset has 10 classes
    state["fc.extra"] = torch.zeros(2)
    del state["block1.0.weight"]
    torch.save(state, tmp_path / "weights.pt")
    line = user_error(splitexit("train", "--model", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "P"),
                                "--weights", str(tmp_path / "weights.pt")),
                      f"weights in {tmp_path / 'weights.pt'} do not fit the model",
                      "1 key missing from the file: block1.0.weight", "1 key the model does not have: fc.extra",
                      "classifier.2.weight is 5x512 in the file, 10x512 in the model")
    assert line.endswith("with as many classes as the dataset has?")  # the whole message, not its first line


@pytest.mark.slow
def test_train_reports_held_out_accuracy_and_logs_as_asked_after_the_command(tmp_path: Path) -> None:
    """`-v`, `--log-level` and `--log-json` after the command's name; accuracy in the text and in --json."""
    package = tmp_path / "P"
    result = ok(splitexit("train", "--model", "digits_cnn", "--data", "digits", "--out", str(package),
                          "--epochs", "1", "--json", "-v", "--log-json"))
    summary = json.loads(result.stdout)
    assert 0 <= summary["calib_accuracy"] <= 1 and summary["calib_samples"] > 0
    assert len(summary["exit_accuracy"]) == len(summary["exits"]) + 1
    assert summary["exit_accuracy"][-1] == summary["calib_accuracy"]
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e["logger"] == "splitexit.model.cpu" and e["level"] == "info" for e in logged), result.stderr
    assert all({"time", "level", "logger", "message"} <= set(e) for e in logged)

    result = ok(splitexit("train", "--model", "digits_cnn", "--data", "digits", "--out", str(package),
                          "--epochs", "1", "--log-level", "INFO"))
    assert "final-exit accuracy" in result.stdout and "held-out calibration samples" in result.stdout
    assert "INFO splitexit.model.cpu: CPU tuning" in result.stderr

    quiet = ok(splitexit("-v", "train", "--model", "digits_cnn", "--data", "digits", "--out", str(package),
                         "--epochs", "1", "--log-level", "error"))  # the command's level wins over the group's -v
    assert "INFO" not in quiet.stderr


def test_etcd_names_a_busy_peer_port_and_refuses_one_port_for_both() -> None:
    port = free_port()
    user_error(splitexit("etcd", "--port", str(port), "--peer-port", str(port)),
               f"--peer-port {port} is the client port too")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        user_error(splitexit("etcd", "--port", str(free_port()), "--peer-port", str(taken)),
                   f"etcd's peer port {taken} (--peer-port) cannot be used", "--peer-port")
        user_error(splitexit("etcd", "--port", str(taken)), f"etcd's client port {taken} (--port)")


@pytest.mark.slow
def test_etcd_takes_the_peer_port_it_is_given_and_says_so(tmp_path: Path) -> None:
    from splitexit.control.etcd_server import find_etcd

    try:
        find_etcd()
    except ClusterError as exc:
        pytest.skip(str(exc))
    port, peer = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "splitexit", "etcd", "--port", str(port), "--peer-port",
                                str(peer), "--data-dir", str(tmp_path / "etcd")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        ready = _line_with(process, "etcd ready", timeout=60)
        assert f"at 127.0.0.1:{port} (peer port {peer};" in ready
        with socket.socket() as probe:  # etcd listens on the peer port it was given
            probe.settimeout(5)
            probe.connect(("127.0.0.1", peer))
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def _line_with(process: subprocess.Popen[str], phrase: str, *, timeout: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            if phrase in line:
                return line
            if not line:
                break
    raise AssertionError(f"no line with {phrase!r}; stderr:\n{process.stderr.read() if process.stderr else ''}")


def test_a_file_with_several_edges_asks_which_edge_runs_and_suggests_a_misspelt_name(tmp_path: Path) -> None:
    path = tmp_path / "edges.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "camera", "role": "edge"}, {"name": "phone", "role": "edge"},
                                              *NODES[1:]]}))
    package = str(tmp_path / "pkg")  # never read: the edge is chosen first
    user_error(splitexit("run", package, "--cluster", str(path)),
               "declares 2 edges (camera, phone): say which one runs here with `--edge NAME`")
    user_error(splitexit("run", package, "--cluster", str(path), "--edge", "phon"),
               "--edge phon: the cluster file has no edge of that name; did you mean 'phone'?")
    user_error(splitexit("plan", package, "--cluster", str(path), "--edge", "phone", "--write", str(tmp_path / "o")),
               "--write:", "declares 2 edges", "let each `splitexit run --edge NAME` plan its own")
