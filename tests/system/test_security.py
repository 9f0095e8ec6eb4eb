"""Only cluster nodes talk: mutual TLS with the cluster CA, the right neighbour, and the cluster token."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from splitexit import ClusterError, EarlyExitNet, ExitPolicy, build_model
from splitexit.config import ModelSource
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.runtime.frame_connection import client_tls, connect
from splitexit.runtime.node import Node
from splitexit.runtime.security import (
    TOKEN_HEADER,
    NodeCredentials,
    init_ca,
    issue_certificate,
)
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.framing import FrameType
from support import free_port, start_nodes, stop_nodes

TOKEN = "correct-horse-battery-staple"
SRC = Path(__file__).resolve().parents[2] / "src" / "splitexit"



@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn")).eval()
    net.set_policy(ExitPolicy(temperatures=(1.0,) * net.num_exits, thresholds=(2.0,) * len(net.exit_cuts)))
    return net


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cluster_dir, intruder_dir = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("intruder")
    init_ca(cluster_dir)
    for name in ("edge", "phone", "cloud1", "cloud2"):
        issue_certificate(cluster_dir, name)
    init_ca(intruder_dir)
    issue_certificate(intruder_dir, "edge")  # right name, wrong CA
    return cluster_dir, intruder_dir


def secure_cluster(tmp_path: Path, tls_dir: Path) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "phone", "role": "edge"},  # a second edge: it may assign only its own plans
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
        "security": {"tls": str(tls_dir), "token_file": "token"}}))
    return path


async def health(address: str, credentials: grpc.ChannelCredentials | None, token: str | None,
                 target: str = "cloud1") -> str:
    """'ok' or the gRPC status name the node answered a Health call with."""
    options = [("grpc.ssl_target_name_override", target)]
    channel = grpc.aio.secure_channel(address, credentials, options=options) if credentials \
        else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            await wire_pb2_grpc.StageServiceStub(channel).Health(
                wire_pb2.HealthRequest(), metadata=((TOKEN_HEADER, token),) if token else (), timeout=5)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def assign(address: str, credentials: grpc.ChannelCredentials, token: str, target: str,
                 edge: str = "edge") -> str:
    """'ok' or the gRPC status name the node answered a stage assignment (of ``edge``'s plan) with."""
    options = [("grpc.ssl_target_name_override", target)]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        try:
            await wire_pb2_grpc.StageServiceStub(channel).Assign(
                wire_pb2.AssignRequest(plan_version=1, stage_sha256="0" * 64, edge=edge),
                metadata=((TOKEN_HEADER, token),), timeout=5)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def hello(host: str, port: int, tls: ssl.SSLContext | None, sender: str, token: str) -> str:
    """What the data plane answers a HELLO with: 'welcome', a GOODBYE's code, or 'handshake failed'."""
    try:
        connection = await asyncio.wait_for(connect(host, port, tls=tls, server_name="cloud1"), 10)
        await connection.send(FrameType.HELLO, wire_pb2.Hello(sender=sender, token=token).SerializeToString())
        frame = await asyncio.wait_for(connection.receive(), 10)
    except (OSError, ssl.SSLError, ConnectionError):
        return "handshake failed"
    await connection.close()
    if frame.kind is FrameType.WELCOME:
        return "welcome"
    return wire_pb2.Goodbye.FromString(frame.metadata).code


async def data_plane_outcomes(pki: tuple[Path, Path], port: int) -> dict[str, str]:
    """Each would-be upstream of cloud1's data plane, before any plan names an upstream (so only the edge)."""
    cluster_dir, intruder_dir = pki
    host = "127.0.0.1"
    plain = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cluster_dir / "ca.pem"))
    return {
        "data: edge with token": await hello(host, port, client_tls(cluster_dir, "edge"), "edge", TOKEN),
        "data: no certificate": await hello(host, port, plain, "edge", TOKEN),
        "data: foreign CA": await hello(host, port, client_tls(intruder_dir, "edge"), "edge", TOKEN),
        "data: wrong neighbour": await hello(host, port, client_tls(cluster_dir, "cloud2"), "cloud2", TOKEN),
        "data: a name its certificate does not carry": await hello(host, port, client_tls(cluster_dir, "cloud2"),
                                                                   "edge", TOKEN),
        "data: wrong token": await hello(host, port, client_tls(cluster_dir, "edge"), "edge", "not-the-token"),
        "data: plain text": await hello(host, port, None, "edge", TOKEN),
    }


async def scenario(net: EarlyExitNet, cluster_file: Path, pki: tuple[Path, Path], cache: Path) -> dict[str, object]:
    cluster_dir, intruder_dir = pki
    cluster = load_cluster(cluster_file)
    nodes = await start_nodes(cluster, cache)
    address = cluster.node("cloud1").address
    edge = NodeCredentials.load(cluster_dir, "edge").channel()
    outcome: dict[str, object] = {
        "edge with token": await health(address, edge, TOKEN),
        "no certificate": await health(address, None, TOKEN),
        "foreign CA": await health(address, NodeCredentials.load(intruder_dir, "edge").channel(), TOKEN),
        "wrong neighbour": await health(address, NodeCredentials.load(cluster_dir, "cloud2").channel(), TOKEN),
        "wrong token": await health(address, edge, "not-the-token-at-all"),
        "no token": await health(address, edge, None),
        "assignment from a worker": await assign(cluster.node("cloud2").address,
                                                 NodeCredentials.load(cluster_dir, "cloud1").channel(), TOKEN,
                                                 "cloud2"),
        "assignment from the edge": await assign(address, edge, TOKEN, "cloud1"),
        "assignment from the other edge, of its own plan": await assign(
            address, NodeCredentials.load(cluster_dir, "phone").channel(), TOKEN, "cloud1", edge="phone"),
        "assignment of another edge's plan": await assign(
            address, NodeCredentials.load(cluster_dir, "phone").channel(), TOKEN, "cloud1", edge="edge"),
        **await data_plane_outcomes(pki, nodes[0].data.port),
    }
    entry = Entry(net, cluster, edge="edge")
    try:
        await entry.start()
        x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        result = await entry.run(TensorDataset(x, torch.zeros(24, dtype=torch.long)))
        outcome["predictions"] = [r.prediction for r in sorted(result.records, key=lambda r: r.index)]
        outcome["expected"] = net.infer(x).prediction.tolist()
    finally:
        await entry.close()
        await stop_nodes(nodes)
    return outcome


def test_only_the_upstream_node_with_the_token_gets_in(net: EarlyExitNet, pki: tuple[Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="splitexit.runtime.node")
    outcome = asyncio.run(scenario(net, secure_cluster(tmp_path, pki[0]), pki, tmp_path / "stages"))
    assert outcome["edge with token"] == "ok"
    assert outcome["no certificate"] == "UNAVAILABLE"  # the TLS handshake fails before any call
    assert outcome["foreign CA"] == "UNAVAILABLE"
    assert outcome["wrong neighbour"] == "PERMISSION_DENIED"
    assert outcome["wrong token"] == outcome["no token"] == "UNAUTHENTICATED"
    assert outcome["assignment from a worker"] == "PERMISSION_DENIED"  # only the edge's coordinator assigns
    assert outcome["assignment from the edge"] == "ok"  # (an unknown stage: the reply asks for the file)
    assert outcome["assignment from the other edge, of its own plan"] == "ok"
    assert outcome["assignment of another edge's plan"] == "PERMISSION_DENIED"  # it cannot retire the edge's plans
    assert outcome["data: edge with token"] == "welcome"
    assert outcome["data: no certificate"] == outcome["data: foreign CA"] == "handshake failed"
    assert outcome["data: wrong neighbour"] == outcome["data: a name its certificate does not carry"] == "wrong_peer"
    assert outcome["data: wrong token"] == "unauthenticated"
    assert outcome["data: plain text"] == "handshake failed"  # the server speaks TLS only: no frame gets through
    assert outcome["predictions"] == outcome["expected"], "the secured chain must still answer correctly"
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("wrong token" in m for m in refusals) and any("certificate names" in m for m in refusals)


def test_plain_text_outside_loopback_is_refused(net: EarlyExitNet, tmp_path: Path) -> None:
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "edge", "role": "edge"},
                                              {"name": "cloud1", "address": f"0.0.0.0:{free_port()}"}]}))
    node = Node(load_cluster(path), "cloud1", cache_dir=tmp_path / "stages")
    with pytest.raises(ClusterError, match="security"):
        asyncio.run(node.start())


def test_source_has_no_unsafe_loading_or_execution() -> None:
    """The grep-level audit: no pickle, no torch.load without weights_only=True, no eval/exec, no shell=True."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b", code) \
                    or re.search(r"(?<![.\w])(eval|exec)\(", code) or "shell=True" in code \
                    or ("torch.load(" in code and "weights_only=True" not in code):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []
