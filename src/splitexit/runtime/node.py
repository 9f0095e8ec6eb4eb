"""A worker node: runs the stage the coordinator assigns it, forwards unconfident rows, relays results up.

A node starts empty. The entry's coordinator tells it, per plan version, which stage file to run, which
replicas of the next tier to send to and with what codec (an :class:`Assignment`), and ships the stage
file if the node lacks it (cached on disk by sha256). This module holds the node's state and lifecycle;
its gRPC face (the control RPCs, and who may call them) is :mod:`~splitexit.runtime.node_service`, its
data plane (the framed connections batches arrive on) :mod:`~splitexit.runtime.data_service`, its
metrics :mod:`~splitexit.runtime.node_metrics`. SIGTERM stops accepting connections, lets in-flight
requests finish, then exits. For ``splitexit profile
--cluster`` a node also times the model on itself and measures its links (see
:mod:`~splitexit.runtime.node_profile`).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from splitexit.aio import stop
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import ClusterError, WireError
from splitexit.hosts import is_loopback
from splitexit.model.cpu import apply_threads
from splitexit.model.stage_file import LoadedStage, load_stage_file
from splitexit.model.stages import Stage
from splitexit.runtime.control_messages import Assignment, LinkHealth, NodeHealth, NodeProfile, ProfileJob
from splitexit.runtime.data_service import DataService
from splitexit.runtime.devices import choose_device
from splitexit.runtime.frame_connection import server_tls
from splitexit.runtime.hop import Hop
from splitexit.runtime.metrics import ChainMetrics, LiveState
from splitexit.runtime.metrics_server import MetricsServer, serve_metrics
from splitexit.runtime.node_profile import (
    check_profile_job,
    machine_identity,
    measure_peer_links,
    node_timing,
    time_model,
)
from splitexit.runtime.node_service import add_node_service
from splitexit.runtime.remote import LinkCounters, LinkReport
from splitexit.runtime.replicas import ReplicaSet
from splitexit.runtime.security import node_credentials
from splitexit.runtime.stage_cache import StageCache
from splitexit.runtime.stage_hop import stage_hop
from splitexit.tensors import TensorInfo
from splitexit.wire.grpc_options import SERVER_KEEPALIVE, SERVER_OWN_PORT, grpc_options

__all__ = ["Node"]

logger = logging.getLogger(__name__)

#: Seconds a stopping node (or a retired plan) waits for its accepted requests to finish.
DRAIN_TIMEOUT = 30.0
#: Seconds between looks at the in-flight count while draining.
DRAIN_POLL = 0.02
#: Seconds gRPC gets to finish its calls once draining is over.
SERVER_GRACE = 1.0
#: Where a node without an address in the cluster file listens (a free port on loopback).
DEFAULT_LISTEN = "127.0.0.1:0"
#: Plans per edge whose stages a node keeps, so requests sent under an edge's previous plans still finish.
KEEP_PLANS = 3


@dataclass
class Served:
    """One plan's stage on this node, and what each edge that keeps the plan here named as its neighbours
    (edges whose plans coincide share it, so their rows are batched together)."""

    version: int
    sha256: str
    stage: Stage
    hop: Hop
    upstreams: dict[str, frozenset[str]] = field(default_factory=dict)  # edge -> who may send, latest edge last
    downstreams: dict[str, tuple[NodeSpec, ...]] = field(default_factory=dict)  # edge -> next tier's replicas

    @property
    def upstream(self) -> frozenset[str]:
        return frozenset().union(*self.upstreams.values())

    def hold(self, assignment: Assignment) -> None:
        """Take what ``assignment``'s edge says about the neighbours (replacing its earlier word)."""
        edge = assignment.edge
        self.release(edge)
        self.upstreams[edge] = frozenset(assignment.upstream)
        self.downstreams[edge] = tuple(assignment.downstream)

    def release(self, edge: str) -> None:
        self.upstreams.pop(edge, None)
        self.downstreams.pop(edge, None)

    def downstream(self) -> list[NodeSpec]:
        """Every replica of the next tier some edge named, at the address the latest assignment gives."""
        peers: dict[str, NodeSpec] = {}
        for named in reversed(self.downstreams.values()):
            for peer in named:
                peers.setdefault(peer.name, peer)
        return list(peers.values())

    async def route(self) -> None:
        """Send on to the replicas :meth:`downstream` names."""
        if isinstance(self.hop.downstream, ReplicaSet):
            await self.hop.downstream.update(self.downstream(), wait=False)


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
        self.compute = choose_device(self.spec.device, self.spec.dtype, member=f"node {name}",
                                     compile=self.spec.compile,
                                     pin_memory=self.spec.pin_memory)  # an absent device fails here, at once
        self.incarnation = uuid.uuid4().hex
        self.machine = machine_identity()
        self.cache = StageCache(cache_dir, pinned=lambda: {served.sha256 for served in self.plans.values()})
        self.plans: dict[int, Served] = {}
        self.holdings: dict[str, list[int]] = {}  # edge -> the plan versions it keeps here, oldest first
        self.newest = 0
        self.metrics = ChainMetrics(name, tier=self.tier)
        #: The node's one worker thread: decoding batches, loading stage files, timing the model.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"splitexit-{name}-decode")
        self.port: int | None = None
        self.metrics_server: MetricsServer | None = None
        self._sent_before: dict[str, LinkCounters] = {}  # what links of retired plans carried
        self._loaded: dict[str, LoadedStage] = {}  # the stages of the kept plans (retired ones are freed)
        self._prepared: dict[str, Stage] = {}  # those stages as they run here (compiled, with `compile`)
        self._retiring: set[asyncio.Task[None]] = set()
        self._assigning = asyncio.Lock()
        self._server: grpc.aio.Server | None = None
        self.data = DataService(self)
        self._accepting = True

    @property
    def address(self) -> str:
        host = (self.spec.address or DEFAULT_LISTEN).rpartition(":")[0]
        return f"{host}:{self.port}"

    @property
    def accepting(self) -> bool:
        """False once the node is stopping: new connections are refused."""
        return self._accepting

    @property
    def in_flight(self) -> int:
        return sum(served.hop.in_flight for served in self.plans.values())

    async def start(self, *, port: int | None = None) -> int:
        """Listen (on the cluster file's port unless ``port`` is given; 0 picks a free one)."""
        self._server = grpc.aio.server(
            options=grpc_options(self.cluster.message_limit) + SERVER_KEEPALIVE + SERVER_OWN_PORT)
        add_node_service(self, self._server)
        host, _, configured = (self.spec.address or DEFAULT_LISTEN).rpartition(":")
        listen = f"{host}:{configured if port is None else port}"
        credentials = node_credentials(self.cluster, self.name)
        if credentials is None and not is_loopback(host):
            raise ClusterError(f"node {self.name} would listen on {host} in plain text; outside loopback set "
                               "`security: {tls: DIR}` in the cluster file (see docs/security.md)")
        if credentials is None:
            logger.info("node %s speaks plain text on loopback %s (no security.tls in the cluster file)",
                        self.name, listen)
        try:
            self.port = self._server.add_secure_port(listen, credentials.server()) if credentials is not None \
                else self._server.add_insecure_port(listen)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ClusterError(f"node {self.name} cannot listen on {listen}: the port is in use (another node, or "
                               "an earlier one still running?). Stop that process, or give this node another "
                               "port (`--port`, or its `address` in the cluster file)")
        await self._server.start()
        tls = self.cluster.security.tls
        try:
            await self.data.start(host, self.spec.data_port or 0, server_tls(Path(tls), self.name) if tls else None)
        except OSError as exc:
            await self._server.stop(grace=0)
            raise ClusterError(f"node {self.name} cannot listen for batches on {host}:{self.spec.data_port} "
                               f"({exc.strerror}): give `data_port` another port in the cluster file, or leave it "
                               "out for a free one") from exc
        self.metrics.watch(self._live_state, asyncio.get_running_loop())
        if self.spec.metrics is not None:
            try:
                self.metrics_server = serve_metrics(self.metrics.registry, self.spec.metrics, self.cluster, self.name)
            except ClusterError:
                await self._server.stop(grace=0)
                await self.data.stop()
                raise
        logger.info("node %s (tier %d) listening on port %d (batches on %d); waiting for a stage", self.name,
                    self.tier, self.port, self.data.port)
        return self.port

    def expected_inputs(self, plan_version: int) -> tuple[TensorInfo, ...]:
        """The tensors a batch of ``plan_version`` must carry; WireError ``unknown_plan`` if not served here."""
        served = self.plans.get(plan_version)
        if served is None:
            raise WireError(f"batch planned for version {plan_version}; node {self.name} serves "
                            f"{sorted(self.plans) or 'no plan yet'}", code="unknown_plan")
        return served.stage.input_tensors

    def upstream_allowed(self, name: str) -> bool:
        return any(name in served.upstream for served in self.plans.values())

    async def assign(self, assignment: Assignment) -> bool:
        """Serve the assigned stage under its plan version for its edge; False if the stage file is missing
        (upload it). Each edge's last :data:`KEEP_PLANS` plans are kept; a plan no edge keeps is retired."""
        sha256, version, edge = assignment.stage_sha256, assignment.plan_version, assignment.edge
        if edge not in self.cluster.edge_names:
            raise WireError(f"an assignment for edge {edge!r}, which the cluster file does not declare (edges: "
                            f"{', '.join(sorted(self.cluster.edge_names))})", code="bad_message")
        if not self.cache.has(sha256):
            return False
        async with self._assigning:
            served = self.plans.get(version)
            if served is not None and served.sha256 != sha256:
                raise WireError(f"plan {version} runs stage {served.sha256[:12]}… here, not {sha256[:12]}…: a plan "
                                "version names one stage per node", code="bad_message")
            if served is None:
                loaded = await self._load(sha256)
                stage = await self._prepare(sha256, loaded.stage)
                codec = None if loaded.stage.end is MODEL_OUTPUT else assignment.codec
                hop = stage_hop(stage, node=self.spec, cluster=self.cluster, plan_version=version, codec=codec,
                                metrics=self.metrics, compute=self.compute)
                served = Served(version, sha256, loaded.stage, hop)
                self.plans[version] = served
                self.metrics.plan_assigned()
                logger.info("node %s serves plan %d of %s: cuts %s..%s", self.name, version, edge,
                            loaded.stage.start, loaded.stage.end)
            served.hold(assignment)
            await served.route()
            held = self.holdings.setdefault(edge, [])
            if version in held:
                held.remove(version)
            held.append(version)
            self.newest = version
            await self._release_old_plans(edge)
            self.data.stages_changed()
        return True

    async def store_stage(self, chunks: AsyncIterator[tuple[str, int, bytes]]) -> tuple[str, int]:
        """Cache an uploaded stage file from its ``(sha256, total size, data)`` chunks; its sha256 and size."""
        sha256, size = await self.cache.store(chunks)
        self.metrics.stage_received(size)
        logger.info("node %s stored stage %s… (%d bytes)", self.name, sha256[:12], size)
        return sha256, size

    async def _load(self, sha256: str) -> LoadedStage:
        if sha256 not in self._loaded:
            def load() -> LoadedStage:
                loaded = load_stage_file(self.cache.read(sha256), sha256=sha256,
                                         trusted_models=self.cluster.trusted_models)
                self.compute.move(loaded.net)  # the stage computes where this node's `device` says
                return loaded

            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(self.executor, load)
            if not self._loaded:  # the package's thread count, here and in the worker thread
                apply_threads(loaded.net.cpu)
                await loop.run_in_executor(self.executor, apply_threads, loaded.net.cpu)
            self._loaded[sha256] = loaded
        return self._loaded[sha256]

    async def _prepare(self, sha256: str, stage: Stage) -> Stage:
        """``stage`` as this node runs it (compiled and warmed up, with `compile`), made once per stage file in
        the worker thread."""
        if sha256 not in self._prepared:
            self._prepared[sha256] = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.compute.prepared, stage, self.cluster.batching.max_batch)
        return self._prepared[sha256]

    def _live_state(self) -> LiveState:
        """What a scrape reports: queue, rows in flight, the newest plan, and every outgoing link since start."""
        links = dict(self._sent_before)
        for served in self.plans.values():
            _add_links(links, served)
        return LiveState(queued=sum(s.hop.executor.queued for s in self.plans.values()), in_flight=self.in_flight,
                         plan=self.newest, links=links)

    async def _release_old_plans(self, edge: str) -> None:
        """Let ``edge`` keep its newest plans; a plan no edge keeps any more is closed once its requests are
        done (in the background), one other edges keep routes where they say."""
        held = self.holdings[edge]
        for version in held[:-KEEP_PLANS]:
            served = self.plans[version]
            served.release(edge)
            if any(version in versions for versions in self.holdings.values() if versions is not held):
                await served.route()
                continue
            # its links' counts stay in the totals (a counter never goes down); its last bytes may be missed
            _add_links(self._sent_before, served)
            retiring = asyncio.get_running_loop().create_task(self._retire(self.plans.pop(version)))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        del held[:-KEEP_PLANS]

    async def _retire(self, served: Served) -> None:
        """Close a retired plan's hop once idle, then free its stage unless a kept plan runs the same file."""
        await served.hop.close_when_idle(DRAIN_TIMEOUT)
        if all(kept.sha256 != served.sha256 for kept in self.plans.values()):
            self._loaded.pop(served.sha256, None)
            self._prepared.pop(served.sha256, None)
            release_freed_memory()

    async def health(self) -> NodeHealth:
        """What a health call answers: readiness, load, cached stages, and every link from here on."""
        links: dict[tuple[str, str], LinkReport] = {}
        for served in self.plans.values():
            if isinstance(served.hop.downstream, ReplicaSet):
                links.update(await served.hop.downstream.health_links())
        return NodeHealth(
            node=self.name, ready=self._accepting, plan_version=self.newest, tier=self.tier,
            queued=sum(s.hop.executor.queued for s in self.plans.values()), in_flight=self.in_flight,
            stages=tuple(self.cache.shas()), incarnation=self.incarnation, machine=self.machine,
            data_port=self.data.port or 0, device=self.compute.name,
            links=tuple(LinkHealth(source, target, link.counters.raw_bytes, link.counters.wire_bytes,
                                   link.counters.messages, link.counters.rows, link.bandwidth or 0.0)
                        for (source, target), link in links.items()))

    async def profile(self, job: ProfileJob) -> NodeProfile:
        """Time the whole-model stage file the job names (if any) here, then measure the links it lists."""
        timing = None
        if job.stage_sha256:
            if not self.cache.has(job.stage_sha256):
                return NodeProfile(machine=self.machine, missing_stage=True)
            loaded = await self._load(job.stage_sha256)
            if loaded.stage.start is not MODEL_INPUT or loaded.stage.end is not MODEL_OUTPUT:
                raise WireError("profiling needs a stage file of the whole model (input to output)",
                                code="bad_message")
            cuts, sizes, repeats = check_profile_job(job, loaded.net)
            logger.info("node %s times %d segments at batch sizes %s", self.name, len(cuts) + 1, sizes)
            async with self._assigning:  # not while a stage is being loaded for a plan
                machine = await asyncio.get_running_loop().run_in_executor(
                    self.executor, time_model, loaded.net, cuts, sizes, repeats, self.compute)
                if all(served.sha256 != job.stage_sha256 for served in self.plans.values()):
                    self._loaded.pop(job.stage_sha256, None)  # the whole model: not kept in memory
            timing = node_timing(machine)
        links = await measure_peer_links(self.cluster, self.name, job.links)
        return NodeProfile(machine=self.machine, timing=timing, links=links)

    async def stop(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Refuse new connections, let accepted requests finish (up to ``grace`` seconds), then shut down."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        await self.data.stop()
        if self._server is not None:
            await self._server.stop(grace=SERVER_GRACE)
        for served in self.plans.values():
            await served.hop.close()
        await stop(*self._retiring)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_server is not None:
            self.metrics_server.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _add_links(totals: dict[str, LinkCounters], served: Served) -> None:
    """Add what ``served``'s outgoing links carried to ``totals`` (by target; new counters, the plan's stay)."""
    if isinstance(served.hop.downstream, ReplicaSet):
        for target, c in served.hop.downstream.counters.items():
            was = totals.get(target, LinkCounters())
            totals[target] = LinkCounters(was.raw_bytes + c.raw_bytes, was.wire_bytes + c.wire_bytes,
                                          was.messages + c.messages, was.rows + c.rows)


def release_freed_memory() -> None:
    """Collect the freed stage (fx modules hold reference cycles), then hand the freed heap back to the OS.

    Without ``malloc_trim`` glibc keeps freed tensor memory in its arenas: eight resnet18 plans grew a node
    from 974 to 1,237 MiB although only three were kept (`tests/system/test_plan_changes_memory.py`).
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()
