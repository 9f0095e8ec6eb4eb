"""The upstream end of a gRPC stream to the next node: a :class:`~splitexit.runtime.hop.Downstream`.

One channel and one bidirectional stream per neighbour, opened by the upstream side (so the edge opens
every connection and works behind NAT). Batches go down through an emulated link; results and
per-request errors come back up the same stream and resolve the futures ``send`` handed out. Tensors
larger than the message limit travel as a header batch followed by chunks.

gRPC errors stop here: a broken stream resolves every pending request with a ``node_unavailable``
:class:`~splitexit.runtime.hop.RowError`; connecting to a dead node raises
:class:`~splitexit.errors.NodeUnavailableError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from splitexit.config import LinkSpec, NodeSpec
from splitexit.errors import ClusterError, NodeUnavailableError
from splitexit.runtime.control_messages import NodeHealth, decode_health
from splitexit.runtime.hop import Outcome, RowError, Stamp, stamp
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.meter import ThroughputMeter
from splitexit.runtime.security import NodeCredentials, is_loopback, token_metadata
from splitexit.runtime.stream_messages import decode_up
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.messages import (
    CLIENT_KEEPALIVE,
    RECONNECT_OPTIONS,
    batch_messages,
    grpc_options,
    hello_message,
    raw_size,
)

__all__ = ["LinkCounters", "LinkReport", "RemoteStage", "open_channel"]

logger = logging.getLogger(__name__)

#: Seconds a connection to the next node may take to come up.
CONNECT_TIMEOUT = 15.0
#: Seconds a health call to the next node may take.
HEALTH_TIMEOUT = 5.0


@dataclass
class LinkCounters:
    """Bytes that crossed one hop downward: before encoding (raw) and on the wire (encoded, compressed)."""

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
                 credentials: NodeCredentials | None = None, token: str | None = None, seed: int = 0,
                 counters: LinkCounters | None = None):
        self.sender, self.target, self.plan_version = sender, target, plan_version
        self.credentials = credentials
        self.metadata = token_metadata(token)
        self.message_limit = message_limit
        self.counters = counters if counters is not None else LinkCounters()
        self.meter = ThroughputMeter()
        self._pending: dict[int, asyncio.Future] = {}
        self._link: EmulatedLink[wire_pb2.Down] = EmulatedLink(link, seed=seed)
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._broken: str | None = None
        self._broken_event = asyncio.Event()

    @property
    def broken(self) -> str | None:
        """Why the stream is unusable (None while it works)."""
        return self._broken

    @property
    def outstanding(self) -> int:
        """Rows sent and not yet answered: the queue depth this sender sees."""
        return len(self._pending)

    async def wait_broken(self) -> None:
        await self._broken_event.wait()

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        address = self.target.address or ""
        self._channel = open_channel(address, self.target.name, self.credentials, self.message_limit)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError as exc:
            await self._channel.close(grace=None)
            raise NodeUnavailableError(f"node {self.target.name} at {address} did not answer within {timeout:.0f} s; "
                                       f"start it with `splitexit node --cluster ... --name {self.target.name}` "
                                       "or `splitexit up --cluster ...`") from exc
        call = self._call = wire_pb2_grpc.StageServiceStub(self._channel).Stream(metadata=self.metadata)
        await call.write(hello_message(self.sender, self.plan_version))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_forever(call), name=f"to-{self.target.name}"),
                       loop.create_task(self._read_forever(call), name=f"from-{self.target.name}")]

    async def send(self, ids: Sequence[int], tensors: list[wire_pb2.Tensor], trace: list[Stamp]
                   ) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ids]
        if self._broken is not None:
            for request_id, future in zip(ids, futures):
                future.set_result(self._unavailable(request_id))
            return futures
        for request_id, future in zip(ids, futures):
            self._pending[request_id] = future
        trace = [*trace, stamp(self.sender, "sent")]
        for message in batch_messages(self.plan_version, ids, tensors, trace, self.message_limit):
            size = message.ByteSize()
            self.counters.wire_bytes += size
            self.counters.messages += 1
            started = time.monotonic()
            await self._link.put(message, size)
            self.meter.busy("link", started, time.monotonic(), size)
        self.counters.rows += len(ids)
        self.counters.raw_bytes += sum(raw_size(t) for t in tensors)
        return futures

    async def _write_forever(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for message in self._link:
                started = time.monotonic()
                await call.write(message)
                self.meter.busy("grpc", started, time.monotonic())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._fail_all(f"writing to {self.target.name} failed: {_describe(exc)}")

    async def _read_forever(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for up in call:
                for outcome in decode_up(up, self.sender):
                    self._resolve(outcome.request_id, outcome)
            self._fail_all(f"{self.target.name} closed the stream")
        except grpc.aio.AioRpcError as exc:
            self._fail_all(f"the stream to {self.target.name} broke: {_describe(exc)}")

    def _resolve(self, request_id: int, outcome: Outcome) -> None:
        future = self._pending.pop(request_id, None)
        if future is None:
            logger.warning("dropping a duplicate or unknown result for request %d from %s", request_id,
                           self.target.name)
        elif not future.done():
            future.set_result(outcome)

    def _unavailable(self, request_id: int) -> RowError:
        return RowError(request_id, "node_unavailable", self._broken or "", self.target.name)

    def _fail_all(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self._broken_event.set()
            if self._pending:
                logger.warning("%s; %d requests lose their answer", reason, len(self._pending))
        pending, self._pending = self._pending, {}
        for request_id, future in pending.items():
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

    async def close(self) -> None:
        await self._link.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close(grace=None)
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
