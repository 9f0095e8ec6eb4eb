"""A node's data plane: the framed connections its upstream neighbours send batches on (``docs/wire.md``).

Per connection: the first frame must be a HELLO within ``hello_timeout``, carrying the cluster token and,
with TLS, the name in the sender's certificate; WELCOME grants up to ``credits`` batches, from the node's
pool of ``node_credits`` that every connection shares (:mod:`~splitexit.runtime.credit_pool`). Each
BATCH is checked (:func:`~splitexit.wire.data_messages.read_batch`) and handed to the hop of its plan; a
bad one is answered with a RequestError for exactly its rows and the connection goes on, while a frame
that breaks the protocol (more batches than granted, a batch id already in flight, an unknown type)
closes it with a GOODBYE. The credit of a batch comes back once its stage has run and its forwarded rows
were handed on (to the connection holding the least, when several share the node), so a node that
cannot keep up holds its upstreams back. Every answer, from this stage or relayed from further down,
goes up in RESULTS frames (through the emulated link of that direction, where the cluster file emulates
one); a batch's CREDIT and the answers ready with it leave in one write.

Request ids are the sender's, scoped to its connection. A node hands rows on under ids of its own (one
counter per node) and gives each answer its sender's id back, so rows from two edges that share a plan here
can be batched together although both edges number their requests from 1.

Node-wide limits hold off hostile or broken peers: connections in all and per address, payload bytes in
the node at once, and the size of a batch payload, set from the stages served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from splitexit.errors import WireError
from splitexit.runtime.credit_pool import CreditPool, Holding
from splitexit.runtime.frame_connection import FrameConnection, FrameServer, serve
from splitexit.runtime.hop import Outcome, RowResult, stamp
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.refusal_log import RefusalLog
from splitexit.runtime.result_messages import rejection_metadata, results_metadata
from splitexit.wire import wire_pb2
from splitexit.wire.data_messages import IncomingBatch, decode_batch, parse, read_batch
from splitexit.wire.framing import Frame, FrameLimits, FrameType
from splitexit.wire.tensor_codec import wraps_payload

if TYPE_CHECKING:
    from splitexit.runtime.node import Node

__all__ = ["ByteBudget", "DataService"]

logger = logging.getLogger(__name__)

#: Seed of the emulated link results travel up on (fixed: runs are repeatable).
UP_LINK_SEED = 1
#: Payload bytes a batch may carry while the node serves no plan (a batch then has nowhere to go anyway).
NO_PLAN_PAYLOAD = 64 * 1024
#: Payloads up to this size are decoded on the event loop (microseconds); larger ones in the node's worker
#: thread, so a big tensor never holds up the loop, unless every tensor is raw and uncompressed (then
#: decoding wraps the received buffer, whatever its size).
INLINE_DECODE = 64 * 1024
#: Room over a stage's raw input size that a compressed payload may take (lz4/zstd frame overhead).
COMPRESSION_SLACK = 1.01

#: The metadata of a CREDIT frame that hands one batch back.
ONE_CREDIT = wire_pb2.Credit(batches=1).SerializeToString()
#: (frame type, batch id, metadata) on its way up.
_Up = tuple[FrameType, int, bytes]


class ByteBudget:
    """Payload bytes the node holds for batches of every connection: ``acquire`` waits while they are spent.
    One batch larger than the whole budget still goes through, alone."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.total)
            self.used += size

    async def release(self, size: int) -> None:
        async with self._changed:
            self.used -= size
            self._changed.notify_all()


class DataService:
    """Serves ``node``'s data plane; :meth:`start` listens, :meth:`stop` closes every connection."""

    def __init__(self, node: Node):
        self.node = node
        self.spec = node.cluster.data_plane
        self.limits = FrameLimits(payload=NO_PLAN_PAYLOAD)  # shared by every connection; see stages_changed
        self.budget = ByteBudget(self.spec.in_flight_bytes)
        self.refusals = RefusalLog(logger)
        self.port: int | None = None
        self._server: FrameServer | None = None
        self._connections: set[FrameConnection] = set()
        self._per_host: Counter[str] = Counter()
        self._row_ids = itertools.count(1)  # the ids rows travel on under from here (see the module docstring)
        self.pool = CreditPool(self.spec.node_credits, self.spec.credits)  # every connection's credits
        self._upwards: dict[Holding, _Upward] = {}  # where each connection's CREDIT frames go

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        self._server = await serve(host, port, self._handle, tls=tls, limits=self.limits,
                                   payload_buffer=self.node.compute.payload_buffer)
        self.port = self._server.port
        return self.port

    def stages_changed(self) -> None:
        """Size the largest accepted payload from the plans served: ``max_batch`` rows of the largest input."""
        largest = max((sum(t.bytes_per_sample for t in s.stage.input_tensors) for s in self.node.plans.values()),
                      default=0)
        wanted = int(largest * self.node.cluster.batching.max_batch * COMPRESSION_SLACK) + NO_PLAN_PAYLOAD
        self.limits.payload = min(wanted, self.spec.max_payload)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            await _goodbye(connection, "stopping", f"node {self.node.name} is shutting down")

    # ---------------------------------------------------------------- one connection
    async def _handle(self, connection: FrameConnection) -> None:
        peer = connection.transport.get_extra_info("peername") if connection.transport else None
        host = str(peer[0]) if isinstance(peer, tuple) else "?"
        if len(self._connections) >= self.spec.max_connections or \
                self._per_host[host] >= self.spec.max_connections_per_host:
            self._refuse("busy", host, f"too many connections (at most {self.spec.max_connections}, "
                                       f"{self.spec.max_connections_per_host} per address)")
            await _goodbye(connection, "busy", f"node {self.node.name} holds too many connections; try later")
            return
        self._connections.add(connection)
        self._per_host[host] += 1
        try:
            sender = await self._hello(connection, host)
            if sender is not None:
                await self._serve(connection, sender, host)
        finally:
            self._forget(connection, host)

    def _forget(self, connection: FrameConnection, host: str) -> None:
        """A connection stops counting against the limits once it is closed (its batches may still finish)."""
        if connection in self._connections:
            self._connections.discard(connection)
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

    async def _hello(self, connection: FrameConnection, host: str) -> str | None:
        """The sender a connection's HELLO proves, or None (the connection was refused and told why)."""
        node = self.node
        try:
            frame = await asyncio.wait_for(connection.receive(), self.spec.hello_timeout)
            if frame.kind is not FrameType.HELLO:
                raise WireError(f"the first frame must be HELLO, not {frame.kind.name}")
            hello = parse(wire_pb2.Hello, frame.metadata, "a HELLO frame")
        except TimeoutError:
            self._refuse("hello_timeout", host, f"no HELLO within {self.spec.hello_timeout:g} s")
            await _goodbye(connection, "hello_timeout", f"say HELLO within {self.spec.hello_timeout:g} s")
            return None
        except WireError as exc:
            self._refuse("bad_message", host, str(exc))
            await _goodbye(connection, "bad_message", str(exc))
            return None
        except ConnectionError:
            return None
        expected = node.cluster.security.token or ""
        if expected and not hmac.compare_digest(hello.token.encode(), expected.encode()):
            self._refuse("unauthenticated", host, "missing or wrong cluster token")
            await _goodbye(connection, "unauthenticated", "missing or wrong cluster token")
            return None
        if node.cluster.security.tls:
            name = connection.peer_name
            if name != hello.sender or not (name in node.cluster.edge_names or node.upstream_allowed(name)):
                self._refuse("wrong_peer", host, f"certificate names {name}, HELLO {hello.sender!r}; expected an "
                                                 "edge or a node of the previous tier")
                await _goodbye(connection, "wrong_peer", f"only an edge or a node of the previous tier may send to "
                                                         f"{node.name}")
                return None
        if not node.accepting:
            await _goodbye(connection, "stopping", f"node {node.name} is shutting down")
            return None
        return hello.sender

    async def _serve(self, connection: FrameConnection, sender: str, host: str) -> None:
        up = _Upward(connection, EmulatedLink(self.node.cluster.link(sender, self.node.name), seed=UP_LINK_SEED),
                     name=f"up-to-{sender}")
        batches: dict[int, asyncio.Task[None]] = {}  # every batch not yet fully answered
        credit = self.pool.join()
        self._upwards[credit] = up
        try:
            welcome = wire_pb2.Welcome(node=self.node.name, credits=credit.granted,
                                       max_rows=self.node.cluster.batching.max_batch)
            await connection.send(FrameType.WELCOME, welcome.SerializeToString())
            while True:
                try:
                    async with asyncio.timeout(self.spec.idle_timeout):  # no task per frame, as wait_for has
                        frame = await connection.receive()
                except TimeoutError:
                    await _goodbye(connection, "idle", f"no frame for {self.spec.idle_timeout:g} s")
                    return
                if frame.kind is FrameType.PING:
                    continue
                if frame.kind is not FrameType.BATCH:
                    raise WireError(f"a {frame.kind.name} frame from upstream")
                if credit.received + 1 > credit.granted:
                    raise WireError(f"batch {credit.received + 1} arrived with {credit.granted} granted so far "
                                    "(at WELCOME, then one per CREDIT)")
                if frame.batch_id in batches:
                    raise WireError(f"batch id {frame.batch_id} is already in flight on this connection")
                await self.budget.acquire(frame.payload.nbytes)
                credit.received += 1  # counted once it is a batch that will run and give its credit back
                task = asyncio.get_running_loop().create_task(self._batch(frame, up, credit))
                batches[frame.batch_id] = task
                task.add_done_callback(_forget(batches, frame.batch_id))
        except WireError as exc:
            self._refuse("bad_message", host, f"{sender}: {exc}")
            await _goodbye(connection, "bad_message", str(exc))
        except ConnectionError:
            pass
        finally:
            self._forget(connection, host)
            await self._hand_out(self.pool.leave(credit))
            await asyncio.gather(*batches.values(), return_exceptions=True)
            del self._upwards[credit]
            await up.close()

    async def _hand_out(self, grants: list[Holding], *, own: Holding | None = None) -> int:
        """Send each connection in ``grants`` (but ``own``) its CREDIT; how many are ``own``'s."""
        for holding in grants:
            if holding is not own:
                await self._upwards[holding].send((FrameType.CREDIT, 0, ONE_CREDIT))
        return grants.count(own) if own is not None else 0

    async def _batch(self, frame: Frame, up: _Upward, credit: Holding) -> None:
        """One batch: check, decode, run (which forwards what goes on), hand the credit back with the answers
        already there, then send every other answer up as it comes."""
        node, size = self.node, frame.payload.nbytes
        arrived = time.perf_counter()
        senders_ids: dict[asyncio.Future, int] = {}  # each row's future -> its id on this connection
        try:
            try:
                batch = read_batch(frame.metadata, frame.payload, max_rows=node.cluster.batching.max_batch,
                                   expect=node.expected_inputs)
            except WireError as exc:
                await self._reject(up, frame, _ids_of(frame.metadata, node.cluster.batching.max_batch), exc)
                return
            senders_ids = dict(zip(await self._run(batch, frame, up), batch.request_ids))
        finally:
            await self.budget.release(size)
            # counted before it is sent: a sender cannot have seen more than the pool granted
            own = await self._hand_out(self.pool.ran(credit), own=credit)
            ready = [future for future in senders_ids if future.done()]
            await up.send(*[(FrameType.CREDIT, 0, ONE_CREDIT)] * own,
                          *self._answers(frame.batch_id, ready, senders_ids, arrived))
        pending = set(senders_ids).difference(ready)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await up.send(*self._answers(frame.batch_id, done, senders_ids, arrived))

    def _answers(self, batch_id: int, done: Iterable[asyncio.Future], senders_ids: dict[asyncio.Future, int],
                 arrived: float) -> list[_Up]:
        """RESULTS frames for the rows of ``done``, under their sender's ids; each answered row's time here
        (since ``arrived``) observed."""
        outcomes: list[Outcome] = [replace(future.result(), request_id=senders_ids[future]) for future in done]
        seconds = time.perf_counter() - arrived
        for outcome in outcomes:
            if isinstance(outcome, RowResult):
                self.node.metrics.latency(seconds)
        return [(FrameType.RESULTS, batch_id, metadata) for metadata in results_metadata(outcomes)]

    async def _run(self, batch: IncomingBatch, frame: Frame, up: _Upward) -> list[asyncio.Future]:
        node = self.node
        ids = batch.request_ids
        served = node.plans.get(batch.plan_version)
        if served is None:  # retired between the envelope check and now
            await self._reject(up, frame, ids, WireError(f"plan {batch.plan_version} was retired", code="unknown_plan"))
            return []
        trace = [*batch.trace, stamp(node.name, "received")]
        try:
            if frame.payload.nbytes <= INLINE_DECODE or all(wraps_payload(header) for header, _ in batch.tensors):
                tensors = decode_batch(batch, served.stage.input_tensors)
            else:
                tensors = await asyncio.get_running_loop().run_in_executor(
                    node.executor, decode_batch, batch, served.stage.input_tensors)
        except WireError as exc:
            await self._reject(up, frame, ids, exc)
            return []
        trace.append(stamp(node.name, "decoded"))
        return await served.hop.send(list(itertools.islice(self._row_ids, len(ids))), tensors, trace)

    async def _reject(self, up: _Upward, frame: Frame, ids: list[int], error: WireError) -> None:
        node = self.node
        node.metrics.refused(error.code)
        node.metrics.rows("refused", len(ids))
        self.refusals.warning(("batch", error.code), "node %s refused %d requests: %s", node.name, len(ids), error)
        await up.send((FrameType.RESULTS, frame.batch_id, rejection_metadata(ids, error, node.name)))

    def _refuse(self, code: str, host: str, why: str) -> None:
        self.node.metrics.refused(code)
        self.refusals.warning((code, host), "node %s refused a data connection from %s: %s", self.node.name, host, why)


def _forget(batches: dict[int, asyncio.Task[None]], batch_id: int) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback that takes a finished batch off its connection's in-flight map."""
    def forget(_: asyncio.Task[None]) -> None:
        batches.pop(batch_id, None)
    return forget


def _ids_of(metadata: bytes, max_rows: int) -> list[int]:
    """The request ids a refused batch names, where its header parses (so the sender can fail exactly those)."""
    try:
        ids = list(parse(wire_pb2.BatchHeader, metadata, "a batch header").request_ids)
    except WireError:
        return []
    return ids if len(ids) <= max_rows else []


class _Upward:
    """Where one connection's answers go: straight onto the connection, or, where the cluster file emulates
    the link back, through an :class:`EmulatedLink` and a task that writes what it delivers."""

    def __init__(self, connection: FrameConnection, link: EmulatedLink[_Up], *, name: str):
        self.connection, self.link = connection, link
        self._writer = asyncio.get_running_loop().create_task(_write_up(connection, link), name=name) \
            if link.emulated else None

    async def send(self, *frames: _Up) -> None:
        """Never raises for a closed connection: its sender is gone, and these answers with it."""
        if self._writer is None:
            if frames and not self.link.closed:
                with contextlib.suppress(ConnectionError):
                    await self.connection.send_all(frames)
            return
        for frame in frames:
            if not self.link.closed:
                await self.link.put(frame, len(frame[2]))

    async def close(self) -> None:
        await self.link.close()
        if self._writer is not None:
            await self._writer


async def _write_up(connection: FrameConnection, up: EmulatedLink[_Up]) -> None:
    try:
        async for kind, batch_id, metadata in up:
            await connection.send(kind, metadata, batch_id=batch_id)
    except ConnectionError:
        async for _ in up:  # the peer is gone: drain, so producers never wait on a dead link
            pass


async def _goodbye(connection: FrameConnection, code: str, message: str) -> None:
    try:
        await connection.send(FrameType.GOODBYE, wire_pb2.Goodbye(code=code, message=message).SerializeToString())
    except ConnectionError:
        pass
    await connection.close()
