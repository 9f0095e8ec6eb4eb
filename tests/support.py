"""Helpers shared by the system tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (good enough for tests on one machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_nodes(cluster, cache_root):  # noqa: ANN001, ANN201 - ClusterSpec, Path -> list[Node]
    """Start every worker of ``cluster`` in this process (empty: the entry's coordinator assigns stages)."""
    from splitexit.runtime.node import Node

    nodes = [Node(cluster, n.name, cache_dir=cache_root / n.name) for n in cluster.nodes[1:]]
    for node in nodes:
        await node.start()
    return nodes


async def stop_nodes(nodes) -> None:  # noqa: ANN001
    for node in nodes:
        await node.stop(grace=2)
