"""A worker: a node serving its stages, plus its membership (an etcd registration under a lease).

The node itself (`runtime/node.py`) knows nothing of the registry; this module is the wiring above both.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from splitexit.control.members import NODES, describe_node
from splitexit.control.registration import Registration
from splitexit.control.registry_backends import open_registry
from splitexit.runtime.node import Node

__all__ = ["serve_node"]

logger = logging.getLogger(__name__)


async def serve_node(node: Node, *, port: int | None = None, ready: asyncio.Event | None = None) -> None:
    """Run ``node`` until SIGTERM or SIGINT, then leave the registry, drain and stop.

    With an etcd registry the node registers itself under a lease it keeps alive; with the embedded one the
    entry finds it by probing the addresses in the cluster file.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start(port=port)
    registration = await _register_node(node)
    print(f"ready {node.name} {node.port} data {node.data.port}", flush=True)  # the line `splitexit up` waits for
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        if registration is not None:
            await registration.close()  # leave first, so the coordinator routes around this node
            await registration.registry.close()
        logger.info("node %s draining %d in-flight requests", node.name, node.in_flight)
        await node.stop()


async def _register_node(node: Node) -> Registration | None:
    spec = node.cluster.registry
    if spec == "embedded":
        return None
    registry = open_registry(spec, node=node.name, certificates=node.cluster.security.tls)
    await registry.start()
    info = await describe_node(node.name, node.address, node.tier, node.incarnation, slowdown=node.spec.slowdown)
    registration = Registration(registry, NODES + node.name, info.to_bytes(), ttl=spec.ttl)
    await registration.start()
    logger.info("node %s registered in etcd (lease TTL %.1f s)", node.name, spec.ttl)
    return registration
