"""Starting nodes the wrong way gets one clear line, not a traceback or a silent surprise (issue 15)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from splitexit.app.run import ensure_cluster_token
from support import free_port

pytestmark = pytest.mark.slow


def write_cluster(root: Path, **cloud1: object) -> Path:
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "edge", "role": "edge"},
                                              {"name": "cloud1", "address": f"127.0.0.1:{free_port()}", **cloud1}]}))
    ensure_cluster_token(path)
    return path


def node(cluster_file: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "splitexit", "node", "--cluster", str(cluster_file),
                             "--name", "cloud1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def refused(process: subprocess.Popen[str]) -> str:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    return " ".join(stderr.split())  # rich wraps long lines


def test_a_second_node_on_a_used_port_refuses_instead_of_sharing_it(tmp_path: Path) -> None:
    cluster_file = write_cluster(tmp_path)
    first = node(cluster_file)
    try:
        assert (first.stdout.readline() if first.stdout else "").startswith("ready cloud1")
        assert "the port is in use" in refused(node(cluster_file))
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_a_used_metrics_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = refused(node(write_cluster(tmp_path, metrics={"address": f"127.0.0.1:{port}"})))
    assert f"cloud1 cannot serve its metrics on 127.0.0.1:{port}" in message and "metrics: {address" in message


def test_the_old_metrics_port_key_says_what_replaced_it(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "edge", "role": "edge"},
                                              {"name": "cloud1", "address": "127.0.0.1:50061", "metrics_port": 9100}]}))
    message = refused(node(path))
    assert "`metrics_port: 9100` is now `metrics: {address: 127.0.0.1:9100}`" in message


def test_the_data_port_is_the_one_given_and_a_used_one_is_named(tmp_path: Path) -> None:
    wanted = free_port()
    cluster_file = write_cluster(tmp_path)
    first = node(cluster_file, "--data-port", str(wanted))
    try:
        ready = first.stdout.readline() if first.stdout else ""
        assert ready.split()[-2:] == ["data", str(wanted)], ready
        message = refused(node(cluster_file, "--port", str(free_port()), "--data-port", str(wanted)))
        assert f"cannot listen for batches on 127.0.0.1:{wanted}" in message and "data_port" in message
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_up_creates_a_missing_log_directory(tmp_path: Path) -> None:
    cluster_file = write_cluster(tmp_path)
    logs = tmp_path / "not" / "there"
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file),
                           "--log-dir", str(logs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        assert (logs / "cloud1.log").is_file()
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device is there")
def test_a_device_this_machine_lacks_is_one_line_naming_it(tmp_path: Path) -> None:
    message = refused(node(write_cluster(tmp_path, device="cuda:1", dtype="bf16")))
    assert "node cloud1 asks for device cuda:1, which this machine does not have (it has cpu)" in message
