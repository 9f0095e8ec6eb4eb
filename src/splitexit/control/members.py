"""What a node tells the registry about itself, and the prober that registers nodes on one machine.

With etcd, each node registers ``nodes/<name>`` itself, under a lease it keeps alive. With the embedded
registry (one machine, no etcd) the nodes cannot reach the entry's in-process registry, so
:class:`HealthProber` registers them on their behalf: every node of the cluster file that answers its
Health call is put under a short lease, renewed by each answer, and dropped when answers stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import Executor

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitexit.aio import stop
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.control.registry import Registry
from splitexit.errors import ClusterError, NodeUnavailableError
from splitexit.runtime.control_client import NodeControl
from splitexit.runtime.control_messages import NodeHealth
from splitexit.runtime.security import NodeCredentials

__all__ = ["NODES", "HealthProber", "NodeInfo", "describe_node", "measure_speed", "parse_node_info"]

logger = logging.getLogger(__name__)

#: Registry prefix of node registrations.
NODES = "nodes/"
#: Seconds between health calls to each node of the cluster file (embedded registry).
PROBE_INTERVAL = 0.5
#: Seconds a probed node's registration outlives its last answer (and a health call may take).
PROBE_TTL = 1.5
#: Seconds, and the matrix size, of the matmul that measures a node's speed.
SPEED_SECONDS = 0.05
SPEED_MATRIX = 256
#: Characters of a node's incarnation kept (the registration's limit).
_INCARNATION = 64


class NodeInfo(BaseModel):
    """A node's registration (JSON in the registry; validated when read, since anyone with access may write)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    address: str = Field(max_length=256)
    tier: int = Field(ge=1, le=64)
    cores: int = Field(0, ge=0)
    memory_bytes: int = Field(0, ge=0)
    speed_gflops: float = Field(0.0, ge=0, description="measured float32 matmul speed, slowdown included")
    incarnation: str = Field("", max_length=_INCARNATION,
                             description="random per process start (a restart is a new member)")

    def spec(self) -> NodeSpec:
        return NodeSpec(name=self.name, address=self.address, tier=self.tier)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def parse_node_info(key: str, value: bytes) -> NodeInfo:
    """The registration under ``key``; ValueError (saying why) if it is not one, or names another node."""
    try:
        info = NodeInfo.model_validate(json.loads(value))
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"not a valid node registration ({exc})") from None
    if key != NODES + info.name:
        raise ValueError(f"it names node {info.name}")
    return info


def measure_speed(slowdown: float = 1.0) -> float:
    """This machine's float32 matmul speed in GFLOP/s, divided by ``slowdown`` (blocking for about
    :data:`SPEED_SECONDS`: run it in an executor)."""
    a = torch.randn(SPEED_MATRIX, SPEED_MATRIX)
    a @ a  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < SPEED_SECONDS:
        a @ a
        runs += 1
    seconds = (time.perf_counter() - started) * slowdown
    return round(2 * SPEED_MATRIX ** 3 * runs / seconds / 1e9, 2)


async def describe_node(name: str, address: str, tier: int, incarnation: str, slowdown: float = 1.0, *,
                        executor: Executor | None = None) -> NodeInfo:
    """This machine's registration; its speed is measured in ``executor`` (default: the loop's), off the loop."""
    speed = await asyncio.get_running_loop().run_in_executor(executor, measure_speed, slowdown)
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return NodeInfo(name=name, address=address, tier=tier, incarnation=incarnation, cores=os.cpu_count() or 0,
                    memory_bytes=pages * os.sysconf("SC_PAGE_SIZE") if pages else 0, speed_gflops=speed)


class HealthProber:
    """Registers the cluster file's workers in an (embedded) registry while they answer Health calls."""

    def __init__(self, cluster: ClusterSpec, registry: Registry, credentials: NodeCredentials | None = None):
        self.cluster, self.registry, self.credentials = cluster, registry, credentials
        self._leases: dict[str, int] = {}
        self._infos: dict[str, NodeInfo] = {}
        self.refusals: dict[str, str] = {}  # node -> why it turns this edge away (until it answers again)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        tiers = self.cluster.tier_by_name()
        for node in self.cluster.workers:
            self._wake[node.name] = asyncio.Event()
            self._tasks.append(asyncio.get_running_loop().create_task(self._probe(node, tiers[node.name])))

    def suspect(self, name: str) -> None:
        """Probe ``name`` now (a stream to it broke)."""
        if name in self._wake:
            self._wake[name].set()

    async def _probe(self, node: NodeSpec, tier: int) -> None:
        try:
            control = NodeControl(node, credentials=self.credentials, token=self.cluster.security.token,
                                  message_limit=self.cluster.message_limit)
        except ClusterError as exc:  # e.g. plain text to an address outside loopback: never probed
            logger.warning("%s", exc)
            self.refusals[node.name] = str(exc)
            return
        try:
            while True:
                reply: NodeHealth | None
                try:
                    reply = await control.health(timeout=PROBE_TTL)
                    self.refusals.pop(node.name, None)
                except NodeUnavailableError:
                    reply = None
                    self.refusals.pop(node.name, None)
                except ClusterError as exc:  # it answers, but not to us: say why once, it will not fix itself
                    if node.name not in self.refusals:
                        logger.warning("%s", exc)
                    self.refusals[node.name] = str(exc)
                    reply = None
                info = None
                if reply is not None and reply.ready:
                    info = NodeInfo(name=node.name, address=control.address, tier=tier,
                                    incarnation=reply.incarnation[:_INCARNATION])
                await self._record(node.name, info)
                wake = self._wake[node.name]
                try:
                    await asyncio.wait_for(wake.wait(), PROBE_INTERVAL)
                except TimeoutError:
                    pass
                wake.clear()
        finally:
            await control.close()

    async def _record(self, name: str, info: NodeInfo | None) -> None:
        """Keep ``name`` registered while it answers; a new incarnation (a restart) re-puts its entry."""
        lease = self._leases.get(name)
        if info is None:
            if lease is not None:
                del self._leases[name]
                self._infos.pop(name, None)
                await self.registry.revoke(lease)
            return
        if lease is None or self._infos.get(name) != info or not await self.registry.keep_alive(lease):
            if lease is None or not await self.registry.keep_alive(lease):
                self._leases[name] = await self.registry.grant(PROBE_TTL)
            self._infos[name] = info
            await self.registry.put(NODES + name, info.to_bytes(), lease=self._leases[name])

    async def close(self) -> None:
        await stop(*self._tasks)
