"""Helpers shared by the system tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from splitexit.control.local_cluster import free_port

__all__ = ["assign_plans", "cli", "cli_ok", "cli_user_error", "data_connection", "data_port", "digits_net",
           "free_port", "rss_kib", "start_nodes", "stop_nodes"]


def cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``splitexit ARGS`` as a user does, in a process of its own (wide columns: no wrapped tables)."""
    return subprocess.run([sys.executable, "-m", "splitexit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"}, cwd=cwd)


def cli_ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def cli_user_error(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """What a user mistake gets: exit code 1, one ``error:`` on stderr, no traceback, every phrase in the message."""
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert "Traceback" not in text, text
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    message = result.stderr[result.stderr.index(lines[0]):].strip()  # the line, and any lines it goes on with
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in:\n{message}"
    return message


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid``, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def assign_plans(control, files, after=None) -> None:  # noqa: ANN001 - ControlPort, [bytes], callable
    """Assign plan 1, 2, ... each running one stage file, as the edge's coordinator does: Assign, and PutStage
    first when the node lacks the file. ``after(version)`` is awaited after each plan."""
    from splitexit.model.stage_file import sha256_hex
    from splitexit.runtime.control_messages import Assignment

    for version, data in enumerate(files, start=1):
        sha = sha256_hex(data)
        assignment = Assignment(plan_version=version, stage_sha256=sha, edge="edge", upstream=("edge",))
        if not await control.assign(assignment):
            await control.put_stage(sha, data)
            assert await control.assign(assignment)
        if after is not None:
            await after(version)


async def start_nodes(cluster, cache_root):  # noqa: ANN001, ANN201 - ClusterSpec, Path -> list[Node]
    """Start every worker of ``cluster`` in this process (empty: the entry's coordinator assigns stages)."""
    from splitexit.runtime.node import Node

    nodes = [Node(cluster, n.name, cache_dir=cache_root / n.name) for n in cluster.workers]
    for node in nodes:
        await node.start()
    return nodes


async def stop_nodes(nodes) -> None:  # noqa: ANN001
    for node in nodes:
        await node.stop(grace=2)


def digits_net(exit_quantile: float = 0.6):  # noqa: ANN201 - EarlyExitNet
    """digits_cnn with random weights and thresholds at ``exit_quantile`` of each exit's confidence on
    random inputs: about ``1 - exit_quantile`` of the rows leave at every early exit."""
    import torch

    from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model

    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = [torch.softmax(o / 0.2, 1).amax(1) for o in net(x)[:-1]]
    net.set_policy(ExitPolicy(temperatures=(0.2,) * net.num_exits,
                              thresholds=tuple(float(s.quantile(exit_quantile)) for s in scores)))
    return net


async def data_port(address: str, token: str | None) -> int:
    """The data-plane port of the node whose gRPC ``address`` this is, from its Health (plain text, loopback)."""
    import grpc

    from splitexit.runtime.security import token_metadata
    from splitexit.wire import wire_pb2, wire_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await wire_pb2_grpc.StageServiceStub(channel).Health(
            wire_pb2.HealthRequest(), metadata=token_metadata(token), timeout=10)
    return int(reply.data_port)


async def data_connection(address: str, token: str | None, *, hello_token: str | None = None,
                          sender: str = "edge", hello: bool = True):  # noqa: ANN201 - (FrameConnection, Frame | None)
    """A raw data-plane connection to the node at gRPC ``address`` (plain text), as any peer could open one.
    With ``hello`` it says HELLO (with ``hello_token``, default ``token``) and returns the node's answer
    (WELCOME, or GOODBYE with the reason) as the second value."""
    from splitexit.runtime.frame_connection import connect
    from splitexit.wire import wire_pb2
    from splitexit.wire.framing import FrameType

    connection = await connect(address.rpartition(":")[0], await data_port(address, token))
    if not hello:
        return connection, None
    said = token if hello_token is None else hello_token
    await connection.send(FrameType.HELLO, wire_pb2.Hello(sender=sender, token=said or "").SerializeToString())
    return connection, await connection.receive()
