"""The edge, wired: the request path, the registry, the health prober, the coordinator and the re-planner.

:class:`Entry` is the asyncio implementation; :class:`EntryClient` is its one synchronous bridge (a
private event loop in a thread) with ``submit(x) -> Future`` and ``run(dataset)``. The request path
itself (resubmission, exactly-once answers) is ``runtime/request_path.py``; this module only composes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from splitexit.aio import stop
from splitexit.config import ClusterSpec
from splitexit.control.coordinator import Coordinator, MembershipChange, Placer, PlanChange, shipped_bytes
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.members import HealthProber
from splitexit.control.registry import Registry
from splitexit.control.registry_backends import open_registry
from splitexit.control.replan import PlanningPlacer, Replanner
from splitexit.model.exits import EarlyExitNet
from splitexit.runtime.hop import Hop
from splitexit.runtime.metrics import ChainMetrics, LiveState
from splitexit.runtime.metrics_server import MetricsServer, serve_metrics
from splitexit.runtime.placement import Placement
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.remote import LinkCounters
from splitexit.runtime.request_path import RequestPath
from splitexit.runtime.security import node_credentials

__all__ = ["DEFAULT_START_TIMEOUT", "Entry", "EntryClient", "RunResult"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds `start()` waits for every tier to have a live node.
DEFAULT_START_TIMEOUT = 30.0


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_s: float
    links: dict[str, LinkCounters]
    placement: Placement
    plan_changes: list[PlanChange] = field(default_factory=list)
    stage_shipments: list[tuple[str, str, int]] = field(default_factory=list)  # (node, stage sha256, bytes)
    interrupted_of: int | None = None  # stopped early (Ctrl-C): how many inputs were asked for
    membership: list[MembershipChange] = field(default_factory=list)
    started_at: float = 0.0  # wall-clock time the run began
    metadata: dict[str, str] = field(default_factory=dict)  # what ran: package, model, data, cluster file, ...
    class_names: tuple[str, ...] = ()  # the dataset's class names, by label (empty: none known)


class Entry:
    """Runs the edge's stage of the current plan here and sends what stays unconfident down the chain."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, *, edge: str | None = None, window: int | None = None,
                 registry: Registry | None = None, placer: Placer | None = None, replan: bool = True,
                 start_timeout: float = DEFAULT_START_TIMEOUT):
        """``edge`` names which of the cluster file's edges this is (needed only when it declares several)."""
        self.net, self.cluster = net, cluster.for_edge(edge)
        self.window = window or self.cluster.window
        self.name = self.cluster.edge.name
        self.start_timeout = start_timeout
        self.registry = registry
        self.placer = placer  # None: the cluster file's placement (see runtime/placement.py)
        self.replan = replan  # with a PlanningPlacer: re-plan when measured links make another plan better
        self.metrics = ChainMetrics(self.name, role="edge")
        self.metrics_server: MetricsServer | None = None
        self.requests = RequestPath(net, self.cluster, window=self.window, on_broken=self._broken, metrics=self.metrics)
        self._replanning: asyncio.Task | None = None
        self._measured: dict[tuple[str, str], float] = {}  # every link's recent bandwidth, as last polled
        self._own_registry = registry is None
        self.coordinator: Coordinator | None = None
        self._prober: HealthProber | None = None

    @property
    def placement(self) -> Placement:
        if self.coordinator is None or self.coordinator.placement is None:
            raise RuntimeError("call `await entry.start()` first")
        return self.coordinator.placement

    @property
    def hop(self) -> Hop | None:
        """The edge's hop of the current plan (None before :meth:`start`)."""
        return self.requests.hop

    async def start(self) -> None:
        """Serve the metrics (where the cluster file asks), join the registry, wait until every tier has a live
        node, and place the chain."""
        self.metrics.watch(self._live_state, asyncio.get_running_loop())
        if self.cluster.edge.metrics is not None and self.metrics_server is None:
            self.metrics_server = serve_metrics(self.metrics.registry, self.cluster.edge.metrics, self.cluster,
                                                self.name)
        if self.registry is None:
            self.registry = open_registry(self.cluster.registry, node=self.name,
                                          certificates=self.cluster.security.tls)
        await self.registry.start()
        if isinstance(self.registry, EmbeddedRegistry):  # nodes cannot register themselves: probe them
            self._prober = HealthProber(self.cluster, self.registry, node_credentials(self.cluster, self.name))
            await self._prober.start()
        prober = self._prober
        self.coordinator = Coordinator(self.net, self.cluster, self.registry, on_plan=self.requests.install,
                                       placer=self.placer, refusals=lambda: prober.refusals if prober else {})
        await self.coordinator.start(wait=self.start_timeout)
        if isinstance(self.placer, PlanningPlacer) and self.replan:
            one_at_a_time = self.window == 1  # larger windows batch requests: a span is then a batch's
            replanner = Replanner(self.placer, self.coordinator.request_replan, lambda: dict(self._measured),
                                  measure_compute=self.requests.compute.means if one_at_a_time else None)
            self._replanning = asyncio.get_running_loop().create_task(self._replan(replanner), name="replanner")

    async def _replan(self, replanner: Replanner) -> None:
        """Keep every link's recent bandwidth at hand (nodes report theirs through Health), and re-plan on it
        (in the re-planner's own thread, closed here)."""
        checking = asyncio.get_running_loop().create_task(replanner.run())
        try:
            while True:
                try:
                    self._measured = await self.link_bandwidths()
                except Exception:  # noqa: BLE001 - a failed poll must not stop serving; the next one tries again
                    logger.exception("reading the links' bandwidths failed")
                await asyncio.sleep(replanner.interval)
        finally:
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
            replanner.close()

    def _live_state(self) -> LiveState:
        """What a scrape of the edge reports: its stage's queue, requests in flight, the plan, its own links,
        the coordinator's plan changes and stage uploads."""
        hop, coordinator = self.requests.hop, self.coordinator
        changes: Counter[str] = Counter(change.cause for change in coordinator.changes) if coordinator else Counter()
        shipped = shipped_bytes(coordinator.shipments) if coordinator else {}
        return LiveState(
            queued=hop.executor.queued if hop else 0, in_flight=self.requests.in_flight,
            plan=coordinator.placement.version if coordinator and coordinator.placement else 0,
            links={peer: replace(counters) for peer, counters in self.requests.sent.items()},  # copies: a snapshot
            plan_changes=changes, stage_shipped=shipped)

    def _broken(self, name: str) -> None:
        """The stream to a first-tier node broke: route around it now (its rows are being resubmitted)."""
        if self.coordinator is not None:
            self.coordinator.node_broke(name)
        if self._prober is not None:
            self._prober.suspect(name)

    async def infer(self, x: torch.Tensor, *, index: int = -1, label: int | None = None) -> RequestRecord:
        """One input (with or without its batch dimension of 1), answered wherever it becomes confident."""
        if self.coordinator is None:
            raise RuntimeError("call `await entry.start()` first")
        return await self.requests.infer(x, index=index, label=label)

    async def run(self, dataset: Dataset, *, on_record: Callable[[RequestRecord], None] | None = None) -> RunResult:
        """Every item of ``dataset`` ((input, label) pairs or bare inputs), ``window`` in flight at a time."""
        started = time.perf_counter()
        records = await self.requests.run(dataset, on_record=on_record)
        return await self.result(records, time.perf_counter() - started)

    async def result(self, records: list[RequestRecord], wall_s: float, *,
                     interrupted_of: int | None = None) -> RunResult:
        """A run's result from its records: with ``interrupted_of``, a run stopped early (of that many inputs)."""
        coordinator = self.coordinator
        return RunResult(records, wall_s, await self.links(), self.placement,
                         plan_changes=list(coordinator.changes) if coordinator else [],
                         stage_shipments=list(coordinator.shipments) if coordinator else [],
                         interrupted_of=interrupted_of,
                         membership=list(coordinator.membership) if coordinator else [],
                         started_at=time.time() - wall_s)

    async def links(self) -> dict[str, LinkCounters]:
        """Byte counters of every link of the chain (see :meth:`RequestPath.links`)."""
        return await self.requests.links()

    async def link_bandwidths(self) -> dict[tuple[str, str], float]:
        """What every link of the current plan delivered lately, bits/s (see :meth:`RequestPath.link_bandwidths`)."""
        return await self.requests.link_bandwidths()

    async def close(self) -> None:
        if self._replanning is not None:
            await stop(self._replanning)
        if self.coordinator is not None:
            await self.coordinator.close()
        if self._prober is not None:
            await self._prober.close()
        await self.requests.close()
        if self.registry is not None and self._own_registry:
            await self.registry.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None


class EntryClient:
    """Synchronous use of an :class:`Entry`: a private event loop runs in a daemon thread."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, **options: object):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitexit-entry", daemon=True)
        self._thread.start()
        self.entry = self._call(self._build(net, cluster, options))

    async def _build(self, net: EarlyExitNet, cluster: ClusterSpec, options: dict) -> Entry:
        entry = Entry(net, cluster, **options)
        try:
            await entry.start()
        except BaseException:
            await entry.close()  # what it opened (metrics server, registry, connections) goes with it
            raise
        return entry

    def _call(self, coroutine: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, x: torch.Tensor, *, label: int | None = None) -> Future:
        """Send one input; the Future resolves to its :class:`RequestRecord`."""
        return asyncio.run_coroutine_threadsafe(self.entry.infer(x, label=label), self._loop)

    def run(self, dataset: Dataset, *, on_record: Callable[[RequestRecord], None] | None = None) -> RunResult:
        """:meth:`Entry.run`, waited for here (``on_record`` is called on the entry's thread)."""
        return self._call(self.entry.run(dataset, on_record=on_record))

    def close(self) -> None:
        try:
            self._call(self.entry.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> EntryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
