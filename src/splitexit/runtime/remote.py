"""The upstream end of a data-plane connection to the next node: a :class:`~splitexit.runtime.hop.Downstream`.

One framed TCP (or mutual-TLS) connection per neighbour, opened by the upstream side (so the edge opens
every connection and works behind NAT), plus a gRPC channel for Health. Connecting asks Health for the
node's data port, connects, says HELLO (name, plan, token) and waits for WELCOME, which grants the
first credits. Each BATCH frame spends one credit and waits for one when none is left: the next node
decides how much we may have in it. Batches go down on the connection, through an emulated link where
the cluster file emulates one; results and per-request
errors come back in RESULTS frames carrying the batch's id, so an answer resolves exactly the row of the
batch it answers (request ids are scoped by batch: the same id sent twice is two rows).

Connection errors stop here: a broken connection resolves every pending row with a ``node_unavailable``
:class:`~splitexit.runtime.hop.RowError`; connecting to a dead node raises
:class:`~splitexit.errors.NodeUnavailableError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitexit.config import LinkSpec, NodeSpec
from splitexit.errors import ClusterError, NodeUnavailableError, WireError
from splitexit.hosts import is_loopback
from splitexit.runtime.control_messages import NodeHealth, decode_health
from splitexit.runtime.frame_connection import FrameConnection, client_tls, connect
from splitexit.runtime.hop import Outcome, RowError, Stamp, stamp
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.meter import ThroughputMeter
from splitexit.runtime.result_messages import decode_results
from splitexit.runtime.security import NodeCredentials, token_metadata
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.data_messages import batch_frame, parse
from splitexit.wire.framing import HEADER, Frame, FrameLimits, FrameType
from splitexit.wire.grpc_options import CLIENT_KEEPALIVE, RECONNECT_OPTIONS, grpc_options
from splitexit.wire.tensor_codec import EncodedTensor, raw_size

__all__ = ["LinkCounters", "LinkReport", "RemoteStage", "open_channel"]

logger = logging.getLogger(__name__)

#: Seconds a connection to the next node may take to come up.
CONNECT_TIMEOUT = 15.0
#: Seconds a health call to the next node may take.
HEALTH_TIMEOUT = 5.0

#: A frame on its way down: (batch id, metadata, payload parts).
_Down = tuple[int, bytes, list]


@dataclass
class LinkCounters:
    """Bytes that crossed one hop downward: before encoding (raw) and on the wire (frames, encoded, compressed)."""

    raw_bytes: int = 0
    wire_bytes: int = 0
    messages: int = 0
    rows: int = 0


@dataclass(frozen=True)
class LinkReport:
    """One link as its sender reports it: the byte counters, and bits per second delivered lately (None: too
    little traffic lately to tell)."""

    counters: LinkCounters
    bandwidth: float | None


class RemoteStage:
    """Sends batches to ``target`` and resolves each row's future from what comes back up."""

    def __init__(self, *, sender: str, target: NodeSpec, link: LinkSpec, plan_version: int, message_limit: int,
                 credentials: NodeCredentials | None = None, tls_dir: Path | None = None, token: str | None = None,
                 ping_every: float = 60.0, seed: int = 0, counters: LinkCounters | None = None,
                 shed: bool = False):
        """``credentials`` (gRPC) and ``tls_dir`` (the data plane) come from the same certificates; without
        them both speak plain text, on loopback only. ``ping_every`` is how often an idle connection says so.
        With ``shed``, rows for which the node has granted no credit are answered ``overloaded`` at once,
        their bytes unsent (the edge then answers them itself); without, they wait for credit."""
        self.shed = shed
        self.sender, self.target, self.plan_version = sender, target, plan_version
        self.credentials, self.tls_dir, self.token = credentials, tls_dir, token
        self.metadata = token_metadata(token)
        self.message_limit = message_limit
        self.ping_every = ping_every
        self.counters = counters if counters is not None else LinkCounters()
        self.meter = ThroughputMeter()
        self._pending: dict[int, dict[int, asyncio.Future]] = {}  # batch id -> request id -> its row's future
        self._rows = 0
        self._batch_ids = itertools.count(1)
        self._link: EmulatedLink[_Down] = EmulatedLink(link, seed=seed)
        self._channel: grpc.aio.Channel | None = None
        self._connection: FrameConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._credits = 0
        self._credit = asyncio.Event()
        self._broken: str | None = None
        self._broken_event = asyncio.Event()

    @property
    def broken(self) -> str | None:
        """Why the connection is unusable (None while it works)."""
        return self._broken

    @property
    def credits(self) -> int:
        """Batches the node has granted and this sender not yet sent."""
        return self._credits

    @property
    def outstanding(self) -> int:
        """Rows sent and not yet answered: the queue depth this sender sees."""
        return self._rows

    async def wait_broken(self) -> None:
        await self._broken_event.wait()

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        address = self.target.address or ""
        name = self.target.name
        self._channel = open_channel(address, name, self.credentials, self.message_limit)
        try:
            async with asyncio.timeout(timeout):
                await self._channel.channel_ready()
                port = (await self.health(timeout)).data_port
                if not port:
                    raise NodeUnavailableError(f"node {name} at {address} has no data plane yet (still starting?)")
                tls = client_tls(self.tls_dir, self.sender) if self.tls_dir is not None else None
                connection = self._connection = await connect(
                    address.rpartition(":")[0], port, tls=tls, server_name=name, limits=FrameLimits(payload=0))
                await connection.send(FrameType.HELLO, wire_pb2.Hello(
                    sender=self.sender, plan_version=self.plan_version, token=self.token or "").SerializeToString())
                welcome = self._welcome(await connection.receive())
        except TimeoutError as exc:
            await self._abandon()
            raise NodeUnavailableError(f"node {name} at {address} did not answer within {timeout:.0f} s; "
                                       f"start it with `splitexit node --cluster ... --name {name}` "
                                       "or `splitexit up --cluster ...`") from exc
        except (OSError, ssl.SSLError, WireError, NodeUnavailableError) as exc:
            await self._abandon()
            if isinstance(exc, NodeUnavailableError):
                raise
            raise NodeUnavailableError(f"the data connection to {name} failed: {type(exc).__name__}: {exc}") from exc
        self._grant(welcome.credits)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_forever(connection), name=f"from-{name}"),
                       loop.create_task(self._ping_forever(connection), name=f"ping-{name}")]
        if self._link.emulated:  # otherwise send writes to the connection itself
            self._tasks.append(loop.create_task(self._write_forever(connection), name=f"to-{name}"))

    def _welcome(self, frame: Frame) -> wire_pb2.Welcome:
        if frame.kind is FrameType.GOODBYE:
            goodbye = parse(wire_pb2.Goodbye, frame.metadata, "a GOODBYE frame")
            raise NodeUnavailableError(f"node {self.target.name} refused the connection: {goodbye.code}: "
                                       f"{goodbye.message}")
        if frame.kind is not FrameType.WELCOME:
            raise WireError(f"node {self.target.name} answered HELLO with {frame.kind.name}, not WELCOME")
        welcome = parse(wire_pb2.Welcome, frame.metadata, "a WELCOME frame")
        if welcome.credits < 1:
            raise WireError(f"node {self.target.name} granted no credit")
        return welcome

    async def send(self, ids: Sequence[int], tensors: list[EncodedTensor], trace: list[Stamp]
                   ) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ids]
        if self.shed and self._credits == 0 and self._broken is None:
            for request_id, future in zip(ids, futures):
                future.set_result(RowError(request_id, "overloaded", f"{self.target.name} has every batch this "
                                           "sender may queue there (its credits) still to run", self.sender))
            return futures
        while self._credits == 0 and self._broken is None:
            self._credit.clear()
            await self._credit.wait()
        if self._broken is not None:
            for request_id, future in zip(ids, futures):
                future.set_result(self._unavailable(request_id))
            return futures
        self._credits -= 1
        batch_id = next(self._batch_ids)
        self._pending[batch_id] = dict(zip(ids, futures))
        self._rows += len(ids)
        metadata, payload = batch_frame(self.plan_version, ids, tensors, [*trace, stamp(self.sender, "sent")])
        size = HEADER.size + len(metadata) + sum(t.size for t in tensors)
        self.counters.wire_bytes += size
        self.counters.messages += 1
        self.counters.rows += len(ids)
        self.counters.raw_bytes += sum(raw_size(t.header) for t in tensors)
        started = time.monotonic()
        if self._link.emulated:
            await self._link.put((batch_id, metadata, payload), size)
        else:
            assert self._connection is not None  # credit comes only with the WELCOME of a connection
            try:
                await self._connection.send(FrameType.BATCH, metadata, payload, batch_id=batch_id)
            except ConnectionError as exc:
                self._fail_all(f"writing to {self.target.name} failed: {exc}")
        self.meter.busy("link", started, time.monotonic(), size)
        return futures

    def _grant(self, batches: int) -> None:
        self._credits += batches
        self._credit.set()

    async def _write_forever(self, connection: FrameConnection) -> None:
        try:
            async for batch_id, metadata, payload in self._link:
                await connection.send(FrameType.BATCH, metadata, payload, batch_id=batch_id)
        except ConnectionError as exc:
            self._fail_all(f"writing to {self.target.name} failed: {exc}")

    async def _read_forever(self, connection: FrameConnection) -> None:
        try:
            while True:
                frame = await connection.receive()
                if frame.kind is FrameType.RESULTS:
                    for outcome in decode_results(frame.metadata, self.sender):
                        self._resolve(frame.batch_id, outcome)
                elif frame.kind is FrameType.CREDIT:
                    self._grant(parse(wire_pb2.Credit, frame.metadata, "a CREDIT frame").batches)
                elif frame.kind is FrameType.GOODBYE:
                    goodbye = parse(wire_pb2.Goodbye, frame.metadata, "a GOODBYE frame")
                    self._fail_all(f"{self.target.name} closed the connection ({goodbye.code}: {goodbye.message})")
                    return
                else:
                    raise WireError(f"a {frame.kind.name} frame from downstream")
        except WireError as exc:
            self._fail_all(f"{self.target.name} sent a bad frame: {exc}")
            await connection.close()
        except ConnectionError as exc:
            self._fail_all(f"the connection to {self.target.name} broke: {exc}")

    async def _ping_forever(self, connection: FrameConnection) -> None:
        try:
            while True:
                await asyncio.sleep(self.ping_every)
                await connection.send(FrameType.PING)
        except ConnectionError:
            return  # the reader reports it

    def _resolve(self, batch_id: int, outcome: Outcome) -> None:
        rows = self._pending.get(batch_id)
        future = rows.pop(outcome.request_id, None) if rows is not None else None
        if future is None:
            logger.warning("dropping a duplicate or unknown result for request %d of batch %d from %s",
                           outcome.request_id, batch_id, self.target.name)
            return
        self._rows -= 1
        if not rows:
            del self._pending[batch_id]
        if not future.done():
            future.set_result(outcome)

    def _unavailable(self, request_id: int) -> RowError:
        return RowError(request_id, "node_unavailable", self._broken or "", self.target.name)

    def _fail_all(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self._broken_event.set()
            self._credit.set()  # senders waiting for credit see the break
            if self._rows:
                logger.warning("%s; %d requests lose their answer", reason, self._rows)
        pending, self._pending, self._rows = self._pending, {}, 0
        for rows in pending.values():
            for request_id, future in rows.items():
                if not future.done():
                    future.set_result(self._unavailable(request_id))

    async def health(self, timeout: float = HEALTH_TIMEOUT) -> NodeHealth:
        """The next node's health (and byte counters of every link from it on)."""
        try:
            reply = await wire_pb2_grpc.StageServiceStub(self._channel).Health(
                wire_pb2.HealthRequest(), metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise NodeUnavailableError(f"health of {self.target.name}: {_describe(exc)}") from exc
        return decode_health(reply)

    async def _abandon(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._channel is not None:
            await self._channel.close(grace=None)

    async def close(self) -> None:
        await self._link.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._abandon()
        self._fail_all(f"the connection to {self.target.name} was closed")


def open_channel(address: str, name: str, credentials: NodeCredentials | None, message_limit: int
                 ) -> grpc.aio.Channel:
    """A channel to node ``name`` at ``address``; with TLS the server must prove it is that node."""
    options = grpc_options(message_limit) + RECONNECT_OPTIONS + CLIENT_KEEPALIVE
    if credentials is None:
        host = address.rpartition(":")[0]
        if not is_loopback(host):  # plain text only where nobody else can read it, in both directions
            raise ClusterError(f"refusing to talk to {name} at {address} in plain text: outside loopback set "
                               "`security: {tls: DIR}` in the cluster file (see docs/security.md)")
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials.channel(),
                                   options=[*options, ("grpc.ssl_target_name_override", name)])


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
