"""`profile --cluster` and `plan --cluster` on a secured cluster whose file names its TLS directory and its
token file relative to itself, run from another working directory.

Every command reads the cluster file with the one loader (``config/load.py``), so ``tls: pki`` and
``token_file: secrets/token`` mean "next to the file" to ``up``, ``profile`` and ``plan`` alike. A command
that read them against its working directory, or did not read the token file, could not open a stream to
the nodes (TLS) or would be refused by them (the token); so the nodes' own timings and the probed links in
``profile.json`` show that it did.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_plan_cli import ok, splitexit
from test_plan_cli import package as package  # the trained digits package (a module fixture)

from splitexit.config.load import load_cluster
from support import free_port

pytestmark = pytest.mark.slow

TOKEN = "a-cluster-token-kept-in-its-own-file"
WORKERS = ("cloud1", "cloud2")
#: Seconds `splitexit up` may take to report its workers ready.
UP_TIMEOUT = 120


@pytest.fixture
def secured(tmp_path: Path) -> tuple[Path, Path]:
    """``conf/cluster.yaml`` with ``tls: pki`` and ``token_file: secrets/token`` beside it (certificates
    from ``splitexit certs``), and ``work/``, the directory every command runs in."""
    conf, work = tmp_path / "conf", tmp_path / "work"
    work.mkdir()
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "token").write_text(TOKEN + "\n")
    ok(splitexit("certs", "init", "pki", cwd=conf))
    for name in ("edge", *WORKERS):
        ok(splitexit("certs", "issue", "pki", name, cwd=conf))
    (conf / "cluster.yaml").write_text(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge"},
                  *({"name": name, "address": f"127.0.0.1:{free_port()}"} for name in WORKERS)],
        "security": {"tls": "pki", "token_file": "secrets/token"}}))
    return conf, work


def test_profile_and_plan_reach_a_secured_cluster_through_relative_secrets(
        package: Path, secured: tuple[Path, Path]) -> None:
    conf, work = secured
    cluster = str(Path("..") / "conf" / "cluster.yaml")  # relative to `work`, not to the file's directory
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", cluster],
                          cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = up.stdout.readline() if up.stdout else ""
        assert "cluster up" in ready, up.stderr.read() if up.stderr else ""
        profiled = json.loads(ok(splitexit("profile", str(package), "--cluster", cluster, "--json",
                                           "--force", cwd=work)).stdout)
        planned_file = work / "planned" / "cluster.yaml"
        planned = json.loads(ok(splitexit("plan", str(package), "--cluster", cluster, "--json",
                                          "--write", str(planned_file), cwd=work)).stdout)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)

    assert sorted(profiled["measured_now"]) == ["cloud1", "cloud1 → cloud2", "cloud2", "edge → cloud1"]
    for name in WORKERS:  # timed on the node itself: its stream was accepted with the token, over TLS
        node = profiled["nodes"][name]
        assert node["measured_on"] == name
        assert all(s["seconds"]["1"]["median"] > 0 for s in node["segments"])
    assert {(link["from"], link["to"]) for link in profiled["links"]} == {("edge", "cloud1"), ("cloud1", "cloud2")}
    assert all(link["rtt_s"] > 0 for link in profiled["links"])

    assert planned["profile_reused"], "plan plans on the profile just measured on the nodes"
    best = planned["best"]
    assert 0.5 < best["accuracy"] <= 1.0 and best["latency_ms"] > 0
    assert {n for s in planned["cloud_only"]["stages"] for n in s["nodes"]} <= set(WORKERS)

    assert TOKEN not in planned_file.read_text(), "the written file names the token's file, never the token"
    written = load_cluster(planned_file)  # the plan's file serves from where it was written
    assert written.security.token == TOKEN
    assert written.security.tls is not None and Path(written.security.tls) == (conf / "pki").resolve()
