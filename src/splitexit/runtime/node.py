"""A worker node: serves one stage over gRPC, forwards unconfident rows, relays results upstream.

Per upstream stream: a reader checks and decodes each batch (a bad one is answered with a
``RequestError`` for exactly its request ids, and the stream goes on), hands it to the :class:`Hop`,
and every answer — from this stage or relayed from further down — goes back up the same stream through
the emulated link of that hop. SIGTERM stops accepting streams, lets in-flight requests finish, then
exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from splitexit.config import ClusterSpec
from splitexit.errors import ClusterError, NodeUnavailableError, WireError
from splitexit.model.exits import EarlyExitNet
from splitexit.runtime import wire_pb2, wire_pb2_grpc
from splitexit.runtime.chain import build_hop, node_credentials
from splitexit.runtime.security import token_matches
from splitexit.runtime.hop import RowError, RowResult, stamp
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.placement import Placement, default_placement
from splitexit.runtime.wire import BatchAssembler, decode_batch, grpc_options

__all__ = ["Node", "serve_node"]

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Batches one upstream stream may have in this node at once; past it the reader stops reading, so gRPC
#: flow control holds the sender back instead of this node queueing without bound.
MAX_BATCHES_PER_STREAM = 128


class _Metrics:
    """Prometheus metrics of one node, in a registry of its own (several nodes may share a process in tests)."""

    def __init__(self, node: str):
        self.registry = CollectorRegistry()
        labels = {"node": node}
        self.requests = Counter("splitexit_requests", "Rows received", ["node"],
                                registry=self.registry).labels(**labels)
        self.answered = Counter("splitexit_answered", "Rows answered by this node's exits", ["node"],
                                registry=self.registry).labels(**labels)
        self.rejected = Counter("splitexit_rejected", "Rows refused as malformed, by reason", ["node", "code"],
                                registry=self.registry)
        self.in_flight = Gauge("splitexit_in_flight", "Rows accepted and not yet answered", ["node"],
                               registry=self.registry).labels(**labels)
        self.node = node


class Node:
    """One worker of a cluster, serving the stage the placement gives it."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, name: str, *, placement: Placement | None = None):
        self.name = name
        self.cluster = cluster
        self.spec = cluster.node(name)
        if self.spec.role == "edge":
            raise ClusterError(f"{name} is the edge; the edge runs inside `splitexit run`, not as a node")
        self.placement = placement or default_placement(net, cluster)
        me = self.placement.of(name)
        self.stage = net.stage(me.start, me.end)
        names = [n.name for n in cluster.nodes]
        self.upstream_name = names[names.index(name) - 1]
        self.upstream_link = cluster.link(self.upstream_name, name)
        self.hop, self.remote = build_hop(net, cluster, self.placement, name)
        self.metrics = _Metrics(name)
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"splitexit-{name}-decode")
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._accepting = True

    async def start(self, *, port: int | None = None) -> int:
        """Listen (on the cluster file's port unless ``port`` is given; 0 picks a free one) and connect on."""
        if self.remote is not None:
            await self.remote.connect()
        self._server = grpc.aio.server(options=grpc_options(self.cluster.message_limit))
        _register(_Servicer(self), self._server)
        host, _, configured = (self.spec.address or "127.0.0.1:0").rpartition(":")
        listen = f"{host}:{configured if port is None else port}"
        credentials = node_credentials(self.cluster, self.name)
        if credentials is not None:
            self.port = self._server.add_secure_port(listen, credentials.server())
        elif host in _LOOPBACK:
            logger.info("node %s speaks plain text on loopback %s (no security.tls in the cluster file)",
                        self.name, listen)
            self.port = self._server.add_insecure_port(listen)
        else:
            raise ClusterError(f"node {self.name} would listen on {host} in plain text; outside loopback set "
                               "`security: {tls: DIR}` in the cluster file (see docs/security.md)")
        if self.port == 0:
            raise ClusterError(f"node {self.name} cannot listen on {self.spec.address}: is the port in use?")
        await self._server.start()
        if self.spec.metrics_port is not None:
            self._metrics_server, _ = start_http_server(self.spec.metrics_port, addr="127.0.0.1",
                                                        registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        logger.info("node %s serving %s on port %d (plan %d)", self.name, self.placement.describe(), self.port,
                    self.placement.version)
        return self.port

    async def stop(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Refuse new streams, let accepted requests finish (up to ``grace`` seconds), then shut down."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + grace
        while self.hop.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        await self.hop.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class _Servicer(wire_pb2_grpc.StageServiceServicer):
    def __init__(self, node: Node):
        self.node = node

    async def _admit(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Refuse (and log) a caller without the cluster token, or whose certificate names another node."""
        node = self.node
        peer = context.peer()
        if not token_matches(context.invocation_metadata(), node.cluster.security.token):
            node.metrics.rejected.labels(node=node.name, code="unauthenticated").inc()
            logger.warning("node %s refused a %s from %s: missing or wrong token", node.name, what, peer)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")
        if node.cluster.security.tls:
            names = {n.decode() for n in (context.auth_context().get("x509_common_name") or [])}
            if node.upstream_name not in names:
                node.metrics.rejected.labels(node=node.name, code="wrong_peer").inc()
                logger.warning("node %s refused a %s from %s: certificate names %s, expected %s", node.name, what,
                               peer, sorted(names) or "nobody", node.upstream_name)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"only {node.upstream_name} may call {node.name}")

    async def Health(self, request: wire_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> wire_pb2.HealthReply:
        await self._admit(context, "health call")
        node = self.node
        reply = wire_pb2.HealthReply(node=node.name, ready=node._accepting, plan_version=node.placement.version,
                                     queued=node.hop.executor.queued, in_flight=node.hop.in_flight)
        remote = node.remote
        if remote is not None:
            c = remote.counters
            reply.links.append(wire_pb2.LinkBytes(source=node.name, target=remote.target.name, raw_bytes=c.raw_bytes,
                                                  wire_bytes=c.wire_bytes, messages=c.messages, rows=c.rows))
            try:
                reply.links.extend((await remote.health()).links)
            except NodeUnavailableError as exc:
                logger.info("%s", exc)
        return reply

    async def Stream(self, requests, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201 - grpc types
        await self._admit(context, "stream")
        node = self.node
        if not node._accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {node.name} is shutting down")
        up: EmulatedLink[wire_pb2.Up] = EmulatedLink(node.upstream_link, seed=1)
        reader = asyncio.get_running_loop().create_task(self._read(requests, up))
        try:
            async for message in up:
                yield message
        finally:
            reader.cancel()

    async def _read(self, requests, up: EmulatedLink) -> None:  # noqa: ANN001 - grpc request iterator
        node = self.node
        assembler = BatchAssembler(plan_version=node.placement.version, expected=node.stage.input_tensors or (),
                                   max_bytes_per_row=sum(t.bytes_per_sample for t in node.stage.input_tensors or ()))
        tasks: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(MAX_BATCHES_PER_STREAM)
        try:
            async for raw in requests:
                try:
                    down = wire_pb2.Down.FromString(raw)
                except DecodeError as exc:
                    await self._reject(up, [], WireError(f"a message that is not a splitexit Down message "
                                                         f"({len(raw)} bytes): {exc}", code="bad_message"))
                    continue
                if down.WhichOneof("body") == "hello":
                    if down.hello.plan_version != node.placement.version:
                        logger.warning("%s connected with plan %d; this node serves plan %d", down.hello.sender,
                                       down.hello.plan_version, node.placement.version)
                    continue
                try:
                    batch = assembler.add(down)
                except WireError as exc:
                    ids = list(down.batch.request_ids) if down.WhichOneof("body") == "batch" else []
                    await self._reject(up, ids, exc)
                    continue
                if batch is not None:
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(self._handle(batch, up))
                    tasks.add(task)
                    task.add_done_callback(lambda done: (tasks.discard(done), slots.release()))
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await up.close()

    async def _handle(self, batch: wire_pb2.Batch, up: EmulatedLink) -> None:
        node = self.node
        ids = list(batch.request_ids)
        node.metrics.requests.inc(len(ids))
        trace = [*((s.node, s.event, s.time) for s in batch.trace), stamp(node.name, "received")]
        try:
            tensors = await asyncio.get_running_loop().run_in_executor(
                node._decoder, decode_batch, batch, node.stage.input_tensors or ())
        except WireError as exc:
            await self._reject(up, ids, exc)
            return
        trace.append(stamp(node.name, "decoded"))
        node.metrics.in_flight.inc(len(ids))
        futures = await node.hop.send(ids, tensors, trace)
        for future in asyncio.as_completed(futures):
            outcome = await future
            node.metrics.in_flight.dec()
            await up.put(*_up_message(outcome, node))

    async def _reject(self, up: EmulatedLink, ids: list[int], error: WireError) -> None:
        node = self.node
        node.metrics.rejected.labels(node=node.name, code=error.code).inc(max(len(ids), 1))
        logger.warning("node %s refused %d requests: %s", node.name, len(ids), error)
        message = wire_pb2.Up(errors=[wire_pb2.RequestError(request_ids=ids, code=error.code, message=str(error),
                                                            node=node.name)])
        await up.put(message, message.ByteSize())


def _register(servicer: _Servicer, server: grpc.aio.Server) -> None:
    """Like the generated registration, but the stream takes raw bytes: the servicer parses each message
    itself, so bytes that are not a message get an error reply instead of killing the whole stream."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream, request_deserializer=None, response_serializer=wire_pb2.Up.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=wire_pb2.HealthRequest.FromString,
            response_serializer=wire_pb2.HealthReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("splitexit.wire.StageService", handlers),))


def _up_message(outcome: RowResult | RowError, node: Node) -> tuple[wire_pb2.Up, int]:
    if isinstance(outcome, RowResult):
        if outcome.node == node.name:
            node.metrics.answered.inc()
        message = wire_pb2.Up(results=[wire_pb2.Result(
            request_id=outcome.request_id, exit=outcome.exit, prediction=outcome.prediction,
            confidence=outcome.confidence, logits=outcome.logits, node=outcome.node,
            trace=[wire_pb2.Stamp(node=n, event=e, time=t) for n, e, t in outcome.trace])])
    else:
        message = wire_pb2.Up(errors=[wire_pb2.RequestError(request_ids=[outcome.request_id], code=outcome.code,
                                                            message=outcome.message, node=outcome.node)])
    return message, message.ByteSize()


async def serve_node(node: Node, *, port: int | None = None, ready: asyncio.Event | None = None) -> None:
    """Run ``node`` until SIGTERM or SIGINT, then drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start(port=port)
    print(f"ready {node.name} {node.port}", flush=True)  # the line `splitexit up` waits for
    if ready is not None:
        ready.set()
    await stop.wait()
    logger.info("node %s draining %d in-flight requests", node.name, node.hop.in_flight)
    await node.stop()
