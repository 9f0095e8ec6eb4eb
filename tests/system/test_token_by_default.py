"""A cluster file with no `security:` is not open to every local process (issue 12, finding 3).

The attack, as the review ran it: with no certificate and no token, a local process sent a node Assign
(downstream: the attacker) and PutStage, and both were accepted. Now `splitexit node` refuses to serve
without a token, `splitexit up` generates one beside the file, and the same local attacker gets
UNAUTHENTICATED on every RPC (and a GOODBYE on the data plane) while the real edge, which reads the same
file, is answered correctly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from splitexit import save
from splitexit.config.load import DEFAULT_TOKEN_FILE, load_cluster
from splitexit.control.edge import Entry
from splitexit.runtime.frame_connection import connect
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.framing import FrameType
from support import data_port, digits_net, free_port

pytestmark = pytest.mark.slow


def write_cluster(root: Path) -> Path:
    save(digits_net(exit_quantile=1.0), root / "pkg")  # nothing exits early: every row needs cloud1
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump({"package": "pkg", "nodes": [
        {"name": "edge", "role": "edge"}, {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}]}))
    return path


def test_a_node_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    cluster_file = write_cluster(tmp_path)
    result = subprocess.run([sys.executable, "-m", "splitexit", "node", "--cluster", str(cluster_file),
                             "--name", "cloud1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "gives no cluster token" in result.stderr and "splitexit up" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def attacks(address: str, data_port: int) -> dict[str, str]:
    """What a local process without the token gets for each RPC ('ok' or the gRPC status name) and for a
    HELLO on the data plane (the GOODBYE's code). (The test finds ``data_port`` with the token; an attacker
    would scan for it.)"""
    async def outcome(call: object) -> str:
        try:
            await call  # type: ignore[misc]
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    async def chunks():  # noqa: ANN202 - an async iterator of StageChunk
        yield wire_pb2.StageChunk(sha256="0" * 64, total_size=4, data=b"evil")

    connection = await connect(address.rpartition(":")[0], data_port)
    await connection.send(FrameType.HELLO, wire_pb2.Hello(sender="edge", plan_version=1).SerializeToString())
    answer = await connection.receive()
    assert answer.kind is FrameType.GOODBYE
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wire_pb2_grpc.StageServiceStub(channel)
        return {
            "Health": await outcome(stub.Health(wire_pb2.HealthRequest(), timeout=5)),
            "Assign": await outcome(stub.Assign(wire_pb2.AssignRequest(
                plan_version=1, stage_sha256="0" * 64,
                downstream=[wire_pb2.Peer(name="evil", address="127.0.0.1:9")]), timeout=5)),
            "PutStage": await outcome(stub.PutStage(chunks(), timeout=5)),
            "data plane": wire_pb2.Goodbye.FromString(answer.metadata).code,
        }


async def serve_the_edge(cluster_file: Path) -> tuple[list[int], list[int]]:
    net = digits_net(exit_quantile=1.0)
    entry = Entry(net, load_cluster(cluster_file))
    try:
        await entry.start()
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        result = await entry.run(TensorDataset(x, torch.zeros(16, dtype=torch.long)))
    finally:
        await entry.close()
    return [r.prediction for r in sorted(result.records, key=lambda r: r.index)], net.infer(x).prediction.tolist()


def test_up_generates_a_token_and_a_local_process_without_it_is_refused(tmp_path: Path) -> None:
    cluster_file = write_cluster(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        token = tmp_path / DEFAULT_TOKEN_FILE
        assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
        assert len(token.read_text().strip()) >= 32
        cluster = load_cluster(cluster_file)
        address = cluster.node("cloud1").address or ""
        refused = asyncio.run(attacks(address, asyncio.run(data_port(address, cluster.security.token))))
        predictions, expected = asyncio.run(serve_the_edge(cluster_file))
    finally:
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=60)
    assert refused == {"Health": "UNAUTHENTICATED", "Assign": "UNAUTHENTICATED", "PutStage": "UNAUTHENTICATED",
                       "data plane": "unauthenticated"}, refused
    assert predictions == expected
    assert f"wrote a new cluster token to {token}" in stderr
