"""The replicas of the next stage as one :class:`~splitexit.runtime.hop.Downstream`.

Each batch goes to the live replica holding the fewest unanswered rows (its queue depth as this sender
sees it) among those with credit left (any live one when none has); ties, the rule under light load, go
round in turn, so every replica gets its share and a replica that (re)joined is used at once. A replica
whose connection breaks has already failed its unanswered rows with ``node_unavailable`` (the entry
resubmits them); the set stops sending to it and reconnects in the background with exponential backoff,
so a node that keeps failing is tried less and less often. With no live replica a batch fails at once
with ``no_route``, which the entry also retries.

The replicas (data-plane :class:`~splitexit.runtime.remote.RemoteStage` connections by default) and the
sleep the back-off waits with are injected, so the choice and the reconnects can be tested on a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.errors import NodeUnavailableError
from splitexit.runtime.control_messages import LinkHealth, NodeHealth
from splitexit.runtime.failover import Backoff
from splitexit.runtime.hop import RowError, Stamp
from splitexit.runtime.meter import ThroughputMeter
from splitexit.runtime.remote import LinkCounters, LinkReport, RemoteStage
from splitexit.runtime.security import NodeCredentials

__all__ = ["RECONNECT", "OpenReplica", "Replica", "ReplicaSet"]

logger = logging.getLogger(__name__)

#: Waits between attempts to reconnect to a replica whose connection broke.
RECONNECT = Backoff(first=0.25, cap=8.0)
#: Seconds one attempt to connect to a replica may take.
RECONNECT_TIMEOUT = 2.0


class Replica(Protocol):
    """One connection to a replica of the next stage, as the set uses it (:class:`RemoteStage` is the real one)."""

    meter: ThroughputMeter

    @property
    def broken(self) -> str | None:
        """Why the connection is unusable (None while it works)."""

    @property
    def outstanding(self) -> int:
        """Rows sent and not yet answered."""

    @property
    def credits(self) -> int:
        """Batches the replica would take now (0: a send waits, or is shed)."""

    async def connect(self, timeout: float) -> None:
        """Open the connection; NodeUnavailableError if the replica does not answer within ``timeout``."""

    async def send(self, ids: Sequence[int], tensors: Any, trace: list[Stamp]) -> list[asyncio.Future]: ...

    async def wait_broken(self) -> None: ...

    async def health(self) -> NodeHealth: ...

    async def close(self) -> None: ...


#: Builds the (unconnected) replica for a peer, counting its bytes in the given counters.
OpenReplica = Callable[[NodeSpec, LinkCounters], Replica]


class ReplicaSet:
    """Connections from ``sender`` to every replica of the next stage, and the choice among them."""

    def __init__(self, *, sender: str, cluster: ClusterSpec, plan_version: int,
                 credentials: NodeCredentials | None = None, on_broken: Callable[[str], None] | None = None,
                 counters: dict[str, LinkCounters] | None = None, open_replica: OpenReplica | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        """``open_replica`` builds a peer's connection (default: the data plane's :class:`RemoteStage`);
        ``sleep`` is what the back-off waits with."""
        self.sender, self.cluster, self.plan_version = sender, cluster, plan_version
        self.credentials = credentials
        self.on_broken = on_broken
        #: Bytes sent to each peer; pass the same dict to the next plan's set to count across plans.
        self.counters: dict[str, LinkCounters] = counters if counters is not None else {}
        self._open: OpenReplica = open_replica or self._remote_replica
        self._sleep = sleep
        self._remotes: dict[str, Replica] = {}
        self._peers: dict[str, NodeSpec] = {}
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._retry_now: dict[str, asyncio.Event] = {}
        self._turn = 0

    async def update(self, peers: Sequence[NodeSpec], *, wait: bool = True) -> None:
        """Serve exactly ``peers`` from now on: connect to new ones, close the ones that left.

        With ``wait`` this returns once every new peer has connected or failed its first attempt.
        """
        wanted = {p.name: p for p in peers}
        for name in [n for n in self._peers if n not in wanted or wanted[n].address != self._peers[n].address]:
            await self._drop(name)
        first_attempts = []
        for name, peer in wanted.items():
            if name in self._peers:
                self._retry_now[name].set()  # re-announced (it may have restarted): skip the rest of its backoff
            else:
                self._peers[name] = peer
                self._retry_now[name] = asyncio.Event()
                attempt: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                self._keepers[name] = asyncio.get_running_loop().create_task(self._keep(peer, attempt),
                                                                             name=f"replica-{name}")
                first_attempts.append(attempt)
        if wait and first_attempts:
            await asyncio.gather(*first_attempts)

    @property
    def live(self) -> list[str]:
        return [name for name, remote in self._remotes.items() if not remote.broken]

    async def send(self, ids: Sequence[int], tensors: Any, trace: list[Stamp]) -> list[asyncio.Future]:
        live = [r for r in self._remotes.values() if not r.broken]
        if not live:
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in ids]
            names = ", ".join(self._peers) or "none assigned"
            for request_id, future in zip(ids, futures):
                future.set_result(RowError(request_id, "no_route", f"no replica of the next stage is reachable "
                                                                    f"({names})", self.sender))
            return futures
        live = [r for r in live if r.credits > 0] or live  # one that would take the batch now, where any would
        fewest = min(r.outstanding for r in live)
        candidates = [r for r in live if r.outstanding == fewest]
        self._turn += 1
        target = candidates[self._turn % len(candidates)]
        return await target.send(ids, tensors, trace)

    def _remote_replica(self, peer: NodeSpec, counters: LinkCounters) -> Replica:
        tls = self.cluster.security.tls
        return RemoteStage(sender=self.sender, target=peer, link=self.cluster.link(self.sender, peer.name),
                           plan_version=self.plan_version, message_limit=self.cluster.message_limit,
                           credentials=self.credentials, tls_dir=Path(tls) if tls else None,
                           token=self.cluster.security.token, ping_every=self.cluster.data_plane.idle_timeout / 3,
                           counters=counters, shed=self.sender in self.cluster.edge_names
                           and self.cluster.fallback != "none")

    async def _keep(self, peer: NodeSpec, first_attempt: asyncio.Future[bool]) -> None:
        """Hold a connection to ``peer`` for as long as it is a peer, reconnecting with backoff."""
        failures = 0
        counters = self.counters.setdefault(peer.name, LinkCounters())
        while True:
            remote = self._open(peer, counters)
            try:
                await remote.connect(timeout=RECONNECT_TIMEOUT)
            except NodeUnavailableError as exc:
                failures += 1
                logger.info("%s: %s; retrying in %.2f s", self.sender, exc, RECONNECT.delay(failures))
            else:
                self._remotes[peer.name] = remote
                failures = 1  # a connection that breaks counts as one failure: the first wait, then doubling
                if not first_attempt.done():
                    first_attempt.set_result(True)
                await remote.wait_broken()
                logger.warning("%s lost %s: %s", self.sender, peer.name, remote.broken)
                if self.on_broken is not None:
                    self.on_broken(peer.name)
                await remote.close()
            if not first_attempt.done():
                first_attempt.set_result(False)
            await self._pause(self._retry_now[peer.name], RECONNECT.delay(failures))

    async def _pause(self, wake: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds``, or less if ``wake`` is set (the peer was announced again)."""
        waits = [asyncio.ensure_future(self._sleep(seconds)), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        wake.clear()

    async def _drop(self, name: str) -> None:
        self._peers.pop(name, None)
        self._retry_now.pop(name, None)
        keeper = self._keepers.pop(name, None)
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        remote = self._remotes.pop(name, None)
        if remote is not None:
            await remote.close()

    def bandwidths(self) -> dict[tuple[str, str], float]:
        """Bits per second each live replica's link delivered lately, where there was enough traffic to tell."""
        measured = {}
        for name, remote in self._remotes.items():
            bandwidth = remote.meter.bandwidth() if not remote.broken else None
            if bandwidth is not None:
                measured[(self.sender, name)] = bandwidth
        return measured

    async def health_links(self) -> dict[tuple[str, str], LinkReport]:
        """This set's links and, through Health, every link further down: byte counters and recent bandwidth."""
        measured = self.bandwidths()
        links = {(self.sender, name): LinkReport(counters, measured.get((self.sender, name)))
                 for name, counters in self.counters.items()}
        for name, remote in [(n, r) for n, r in self._remotes.items() if not r.broken]:
            try:
                reply = await remote.health()
            except NodeUnavailableError:  # a nicety; a report without these links is still right
                continue
            for link in downstream_of(name, reply.links, ours=links):
                bandwidth = link.bandwidth_bps if math.isfinite(link.bandwidth_bps) and link.bandwidth_bps > 0 else None
                links[(link.source, link.target)] = LinkReport(
                    LinkCounters(link.raw_bytes, link.wire_bytes, link.messages, link.rows), bandwidth)
        return links

    async def close(self) -> None:
        for name in list(self._peers):
            await self._drop(name)


def downstream_of(replica: str, reported: Sequence[LinkHealth], *, ours: Mapping[tuple[str, str], object]
                  ) -> list[LinkHealth]:
    """The links a replica may report: its own, and those of nodes it (transitively) sends to. A report about
    a link upstream of it, or one this sender measures itself, would let a member steer re-planning."""
    senders, left = {replica}, list(reported)
    accepted: list[LinkHealth] = []
    while True:
        found = [link for link in left if link.source in senders and (link.source, link.target) not in ours]
        if not found:
            return accepted
        accepted += found
        senders |= {link.target for link in found}
        left = [link for link in left if link not in found]
