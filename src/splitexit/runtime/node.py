"""A worker node: runs the stage the coordinator assigns it, forwards unconfident rows, relays results up.

A node starts empty. The entry's coordinator tells it, per plan version, which stage file to run, which
replicas of the next tier to send to and with what codec (``Assign``), and ships the stage file if the
node lacks it (``PutStage``; cached on disk by sha256). Per upstream stream: a reader checks and decodes
each batch (a bad one is answered with a ``RequestError`` for exactly its request ids, and the stream goes
on), hands it to the hop of the batch's plan, and every answer — from this stage or relayed from further
down — goes back up the same stream through the emulated link of that hop. SIGTERM stops accepting
streams, lets in-flight requests finish, then exits. For ``splitexit profile --cluster`` a node also times
the model on itself and measures its links (``Profile``, see :mod:`~splitexit.runtime.node_profile`) and
answers link probes (``Probe``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import ValidationError

from splitexit.config import ClusterSpec, NodeSpec, describe_validation_error
from splitexit.errors import ClusterError, IntegrityError, SplitExitError, WireError
from splitexit.model.cpu import apply_threads
from splitexit.model.stage_file import LoadedStage, load_stage_file
from splitexit.model.stages import Stage
from splitexit.runtime.hop import Hop, RowError, RowResult, stamp
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.node_profile import (
    check_profile_request,
    machine_identity,
    measure_peer_links,
    time_model,
    timing_reply,
)
from splitexit.runtime.remote import LinkReport
from splitexit.runtime.security import node_credentials, token_matches
from splitexit.runtime.stage_cache import StageCache
from splitexit.runtime.stage_hop import stage_hop
from splitexit.tensors import TensorInfo
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.codec import parse_codec
from splitexit.wire.messages import BatchAssembler, decode_batch, grpc_options

__all__ = ["Node"]

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Batches one upstream stream may have in this node at once; past it the reader stops reading, so gRPC
#: flow control holds the sender back instead of this node queueing without bound.
MAX_BATCHES_PER_STREAM = 128
#: Plans whose stages a node keeps, so requests sent under the previous plans still finish.
KEEP_PLANS = 3


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


@dataclass
class _Served:
    """One plan's stage on this node."""

    version: int
    sha256: str
    stage: Stage
    hop: Hop
    upstream: frozenset[str]


class Node:
    """One worker: waits for the coordinator to assign it a stage, then serves it to the previous tier.

    It keeps the stages of the last few plans, so requests sent under an older plan still finish while the
    coordinator moves the chain to a new one.
    """

    def __init__(self, cluster: ClusterSpec, name: str, *, cache_dir: Path, spec: NodeSpec | None = None):
        self.name = name
        self.cluster = cluster
        try:
            self.spec = spec or cluster.node(name)
        except KeyError:
            raise ClusterError(f"node {name!r} is not in the cluster file; add it there, or give its address "
                               "(and tier) on the command line") from None
        if self.spec.role == "edge":
            raise ClusterError(f"{name} is the edge; the edge runs inside `splitexit run`, not as a node")
        self.tier = cluster.tier_by_name().get(name, self.spec.tier or 1)
        self.incarnation = uuid.uuid4().hex
        self.machine = machine_identity()
        self.cache = StageCache(cache_dir)
        self.plans: dict[int, _Served] = {}
        self.newest = 0
        self.metrics = _Metrics(name)
        self._loaded: dict[str, LoadedStage] = {}
        self._assigning = asyncio.Lock()
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"splitexit-{name}-decode")
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._accepting = True

    @property
    def address(self) -> str:
        host = (self.spec.address or "127.0.0.1:0").rpartition(":")[0]
        return f"{host}:{self.port}"

    @property
    def in_flight(self) -> int:
        return sum(served.hop.in_flight for served in self.plans.values())

    async def start(self, *, port: int | None = None) -> int:
        """Listen (on the cluster file's port unless ``port`` is given; 0 picks a free one)."""
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
        logger.info("node %s (tier %d) listening on port %d; waiting for a stage", self.name, self.tier, self.port)
        return self.port

    async def assign(self, request: wire_pb2.AssignRequest) -> wire_pb2.AssignReply:
        """Serve the stage ``request`` names under its plan version (see the AssignRequest message)."""
        sha256 = request.stage_sha256
        if not self.cache.has(sha256):
            return wire_pb2.AssignReply(missing_stage=True)
        peers = [_peer_spec(p) for p in request.downstream]
        async with self._assigning:
            served = self.plans.get(request.plan_version)
            if served is None or served.sha256 != sha256:
                loaded = await self._load(sha256)
                codec = parse_codec(request.codec) if loaded.stage.end is not None else None
                hop = stage_hop(loaded.stage, node=self.spec, cluster=self.cluster, plan_version=request.plan_version,
                                codec=codec)
                served = _Served(request.plan_version, sha256, loaded.stage, hop, frozenset(request.upstream))
                self.plans[request.plan_version] = served
                logger.info("node %s serves plan %d: cuts %s..%s", self.name, request.plan_version,
                            loaded.stage.start, loaded.stage.end)
            else:
                served.upstream = frozenset(request.upstream)
            if served.hop.downstream is not None:
                await served.hop.downstream.update(peers, wait=False)  # type: ignore[attr-defined]
            self.newest = request.plan_version
            await self._retire_old_plans()
        return wire_pb2.AssignReply()

    async def _load(self, sha256: str) -> LoadedStage:
        if sha256 not in self._loaded:
            data = self.cache.read(sha256)
            loaded = await asyncio.get_running_loop().run_in_executor(
                self._decoder, lambda: load_stage_file(data, sha256=sha256,
                                                       trusted_models=self.cluster.trusted_models))
            if not self._loaded:  # the package's thread count, here and in the decoder's thread
                apply_threads(loaded.net.cpu)
                await asyncio.get_running_loop().run_in_executor(self._decoder, apply_threads, loaded.net.cpu)
            self._loaded[sha256] = loaded
        return self._loaded[sha256]

    async def _retire_old_plans(self) -> None:
        """Keep the newest plans; close older ones once their requests are done (in the background)."""
        for version in sorted(self.plans, key=lambda v: v == self.newest)[:max(0, len(self.plans) - KEEP_PLANS)]:
            served = self.plans.pop(version)
            asyncio.get_running_loop().create_task(served.hop.close_when_idle(DRAIN_TIMEOUT))

    async def profile(self, request: wire_pb2.ProfileRequest) -> wire_pb2.ProfileReply:
        """Time the whole-model stage file the request names (if any) here, then measure the links it lists."""
        peers = [_peer_spec(p) for p in request.links]
        reply = wire_pb2.ProfileReply(machine=self.machine)
        if request.stage_sha256:
            if not self.cache.has(request.stage_sha256):
                return wire_pb2.ProfileReply(missing_stage=True)
            loaded = await self._load(request.stage_sha256)
            if loaded.stage.start is not None or loaded.stage.end is not None:
                raise WireError("profiling needs a stage file of the whole model (input to output)",
                                code="bad_message")
            cuts, sizes, repeats = check_profile_request(request, loaded.net)
            logger.info("node %s times %d segments at batch sizes %s", self.name, len(cuts) + 1, sizes)
            async with self._assigning:  # not while a stage is being loaded for a plan
                machine = await asyncio.get_running_loop().run_in_executor(
                    self._decoder, time_model, loaded.net, cuts, sizes, repeats)
                if all(served.sha256 != request.stage_sha256 for served in self.plans.values()):
                    self._loaded.pop(request.stage_sha256, None)  # the whole model: not kept in memory
            reply = timing_reply(machine)
        reply.links.extend(await measure_peer_links(self.cluster, self.name, peers))
        return reply

    def upstream_allowed(self, name: str) -> bool:
        return any(name in served.upstream for served in self.plans.values())

    async def stop(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Refuse new streams, let accepted requests finish (up to ``grace`` seconds), then shut down."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + grace
        while self.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        for served in self.plans.values():
            await served.hop.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _peer_spec(peer: wire_pb2.Peer) -> NodeSpec:
    try:
        return NodeSpec(name=peer.name, address=peer.address)
    except ValidationError as exc:
        raise WireError(f"downstream peer {peer.name[:64]!r} at {peer.address[:64]!r} is not a valid node: "
                        f"{describe_validation_error(exc)}", code="bad_message") from exc


class _Servicer(wire_pb2_grpc.StageServiceServicer):
    def __init__(self, node: Node):
        self.node = node

    async def _admit(self, context: grpc.aio.ServicerContext, what: str, *, control: bool = False,
                     member: bool = False) -> set[str]:
        """Refuse (and log) a caller without the cluster token or, with TLS, without a certificate naming a node
        allowed to make this call: the edge for control calls, any node of the cluster for probes (``member``),
        the edge or a node of the previous tier for streams. Returns the names the caller's certificate
        carries (empty without TLS)."""
        node = self.node
        peer = context.peer()
        if not token_matches(context.invocation_metadata(), node.cluster.security.token):
            node.metrics.rejected.labels(node=node.name, code="unauthenticated").inc()
            logger.warning("node %s refused a %s from %s: missing or wrong token", node.name, what, peer)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")
        if not node.cluster.security.tls:
            return set()
        names = {n.decode() for n in (context.auth_context().get("x509_common_name") or [])}
        edge = node.cluster.edge.name
        members = {n.name for n in node.cluster.nodes}
        allowed = edge in names if control else bool(names & members) if member else \
            any(n == edge or node.upstream_allowed(n) for n in names)
        if not allowed:
            node.metrics.rejected.labels(node=node.name, code="wrong_peer").inc()
            expected = edge if control else "a node of this cluster" if member else \
                "the edge or a node of the previous tier"
            logger.warning("node %s refused a %s from %s: certificate names %s, expected %s", node.name, what,
                           peer, sorted(names) or "nobody", expected)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"only {expected} may make this call to {node.name}")
        return names

    async def Health(self, request: wire_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> wire_pb2.HealthReply:
        await self._admit(context, "health call")
        node = self.node
        reply = wire_pb2.HealthReply(node=node.name, ready=node._accepting, plan_version=node.newest, tier=node.tier,
                                     queued=sum(s.hop.executor.queued for s in node.plans.values()),
                                     in_flight=node.in_flight, stages=node.cache.shas(),
                                     incarnation=node.incarnation, machine=node.machine)
        links: dict[tuple[str, str], LinkReport] = {}
        for served in node.plans.values():
            if served.hop.downstream is not None:
                links.update(await served.hop.downstream.health_links())  # type: ignore[attr-defined]
        for (source, target), link in links.items():
            c = link.counters
            reply.links.append(wire_pb2.LinkBytes(source=source, target=target, raw_bytes=c.raw_bytes,
                                                  wire_bytes=c.wire_bytes, messages=c.messages, rows=c.rows,
                                                  bandwidth_bps=link.bandwidth or 0.0))
        return reply

    async def Assign(self, request: wire_pb2.AssignRequest, context: grpc.aio.ServicerContext
                     ) -> wire_pb2.AssignReply:
        await self._admit(context, "stage assignment", control=True)
        try:
            if request.codec:
                parse_codec(request.codec)
            return await self.node.assign(request)
        except (WireError, SplitExitError, ValueError) as exc:
            logger.warning("node %s refused plan %d: %s", self.node.name, request.plan_version, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.node.name}: {exc}")

    async def PutStage(self, requests, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201 - grpc types
        await self._admit(context, "stage upload", control=True)

        async def chunks():  # noqa: ANN202
            async for chunk in requests:
                yield chunk.sha256, chunk.total_size, chunk.data

        try:
            sha256, size = await self.node.cache.store(chunks())
        except (WireError, IntegrityError) as exc:
            logger.warning("node %s refused a stage upload: %s", self.node.name, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.node.name}: {exc}")
        logger.info("node %s stored stage %s… (%d bytes)", self.node.name, sha256[:12], size)
        return wire_pb2.PutStageReply(size=size)

    async def Profile(self, request: wire_pb2.ProfileRequest, context: grpc.aio.ServicerContext
                      ) -> wire_pb2.ProfileReply:
        await self._admit(context, "profile request", control=True)
        try:
            return await self.node.profile(request)
        except (WireError, SplitExitError) as exc:
            logger.warning("node %s refused a profile request: %s", self.node.name, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.node.name}: {exc}")

    async def Probe(self, request: wire_pb2.ProbeRequest, context: grpc.aio.ServicerContext) -> wire_pb2.ProbeReply:
        await self._admit(context, "link probe", member=True)
        return wire_pb2.ProbeReply(size=len(request.payload))

    async def Stream(self, requests, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN201 - grpc types
        names = await self._admit(context, "stream")
        node = self.node
        if not node._accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {node.name} is shutting down")
        iterator = requests.__aiter__()
        try:
            hello = wire_pb2.Down.FromString(await iterator.__anext__())
        except (DecodeError, StopAsyncIteration):
            hello = wire_pb2.Down()
        if hello.WhichOneof("body") != "hello" or (names and hello.hello.sender not in names):
            node.metrics.rejected.labels(node=node.name, code="bad_message").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a stream must start with a Hello naming the "
                                                                  "sender (the name in its certificate, with TLS)")
        up: EmulatedLink[wire_pb2.Up] = EmulatedLink(node.cluster.link(hello.hello.sender, node.name), seed=1)
        reader = asyncio.get_running_loop().create_task(self._read(iterator, up))
        try:
            async for message in up:
                yield message
        finally:
            reader.cancel()

    def _expect(self, plan_version: int) -> tuple[TensorInfo, ...]:
        served = self.node.plans.get(plan_version)
        if served is None:
            raise WireError(f"batch planned for version {plan_version}; node {self.node.name} serves "
                            f"{sorted(self.node.plans) or 'no plan yet'}", code="unknown_plan")
        return served.stage.input_tensors or ()

    async def _read(self, requests, up: EmulatedLink) -> None:  # noqa: ANN001 - grpc request iterator
        assembler = BatchAssembler(self._expect)
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
        served = node.plans.get(batch.plan_version)
        if served is None:  # retired between the envelope check and now
            await self._reject(up, ids, WireError(f"plan {batch.plan_version} was retired", code="unknown_plan"))
            return
        trace = [*((s.node, s.event, s.time) for s in batch.trace), stamp(node.name, "received")]
        try:
            tensors = await asyncio.get_running_loop().run_in_executor(
                node._decoder, decode_batch, batch, served.stage.input_tensors or ())
        except WireError as exc:
            await self._reject(up, ids, exc)
            return
        trace.append(stamp(node.name, "decoded"))
        node.metrics.in_flight.inc(len(ids))
        futures = await served.hop.send(ids, tensors, trace)
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
        "Assign": grpc.unary_unary_rpc_method_handler(
            servicer.Assign, request_deserializer=wire_pb2.AssignRequest.FromString,
            response_serializer=wire_pb2.AssignReply.SerializeToString),
        "PutStage": grpc.stream_unary_rpc_method_handler(
            servicer.PutStage, request_deserializer=wire_pb2.StageChunk.FromString,
            response_serializer=wire_pb2.PutStageReply.SerializeToString),
        "Profile": grpc.unary_unary_rpc_method_handler(
            servicer.Profile, request_deserializer=wire_pb2.ProfileRequest.FromString,
            response_serializer=wire_pb2.ProfileReply.SerializeToString),
        "Probe": grpc.unary_unary_rpc_method_handler(
            servicer.Probe, request_deserializer=wire_pb2.ProbeRequest.FromString,
            response_serializer=wire_pb2.ProbeReply.SerializeToString),
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
