"""The edge: runs the first stage locally, streams the rest of the chain, and collects one outcome per input.

:class:`Entry` is the asyncio implementation; :class:`EntryClient` is its one synchronous bridge (a
private event loop in a thread) with ``submit(x) -> Future`` and ``run(dataset)``.

The entry owns every request until its answer arrives: it keeps the input, and when the request's rows
were lost with a node (``node_unavailable``), found no route (``no_route``) or reached a node that has not
got the current plan yet (``unknown_plan``), it sends the input again, under the same id, along whatever
route the coordinator has set up by then. A request is answered exactly once; a late duplicate of an
answer is dropped by id where it arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Coroutine, TypeVar

import torch
from torch.utils.data import Dataset

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.control.coordinator import Coordinator, Layout, PlanChange
from splitexit.runtime.failover import Backoff
from splitexit.control.members import HealthProber
from splitexit.control.registry import EmbeddedRegistry, Registry, open_registry
from splitexit.errors import ConfigError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stage_file import without_exits
from splitexit.model.stages import Stage
from splitexit.runtime.chain import node_credentials, stage_hop
from splitexit.runtime.codec import CodecSpec
from splitexit.runtime.hop import Hop, RowError, RowResult, Stamp
from splitexit.runtime.meter import ComputeMeter
from splitexit.runtime.placement import Placement
from splitexit.runtime.remote import LinkCounters
from splitexit.runtime.replan import PlannedLayout, Replanner

__all__ = ["Entry", "EntryClient", "RequestRecord", "RunResult"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Parts of a request's latency, in the order the report shows them.
BREAKDOWN = ("edge_compute", "encode", "link", "queue", "remote_compute", "decode")
#: Outcomes that say "this route failed", not "this input is bad": the entry sends the input again.
RETRYABLE = frozenset({"node_unavailable", "no_route", "unknown_plan"})


@dataclass(frozen=True)
class RequestRecord:
    """One input's outcome, as `splitexit run --out` writes it."""

    index: int
    request_id: int
    prediction: int | None
    exit: int | None
    node: str
    confidence: float | None
    label: int | None
    latency_ms: float
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    finished: float = 0.0  # wall-clock time the answer arrived


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_s: float
    links: dict[str, LinkCounters]
    placement: Placement
    plan_changes: list[PlanChange] = field(default_factory=list)
    stage_shipments: list[tuple[str, str, int]] = field(default_factory=list)  # (node, stage sha256, bytes)


class Entry:
    """Runs the edge's stage of the current plan here and sends what stays unconfident down the chain."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, *, window: int | None = None,
                 registry: Registry | None = None, layout: Layout | None = None, replan: bool = True,
                 start_timeout: float = 30.0):
        self.net, self.cluster = net, cluster
        self.window = window or cluster.window
        self.name = cluster.edge.name
        self.start_timeout = start_timeout
        self.retry = Backoff(cluster.retry.first_wait, cluster.retry.max_wait)
        self.registry = registry
        self.layout = layout  # None: the cluster file's placement (see runtime/placement.py)
        self.replan = replan  # with a PlannedLayout: re-plan when measured links make another plan better
        self._replanning: asyncio.Task | None = None
        self._measured: dict[tuple[str, str], float] = {}  # every link's recent bandwidth, as last polled
        self._own_registry = registry is None
        self.coordinator: Coordinator | None = None
        self._prober: HealthProber | None = None
        self._hop: Hop | None = None
        self._version = 0
        self._retired: dict[Hop, asyncio.Task] = {}  # hops of earlier plans, closing once their requests finish
        self._sent: dict[str, LinkCounters] = {}  # bytes the edge sent to each peer, over every plan
        self._compute = ComputeMeter()  # how long each node's stage computed per request, under this plan
        self._ids = itertools.count(1)
        self._slots: asyncio.Semaphore | None = None

    @property
    def placement(self) -> Placement:
        if self.coordinator is None or self.coordinator.placement is None:
            raise RuntimeError("call `await entry.start()` first")
        return self.coordinator.placement

    @property
    def hop(self) -> Hop | None:
        """The edge's hop of the current plan (None before :meth:`start`)."""
        return self._hop

    async def start(self) -> None:
        """Join the registry, wait until every tier has a live node, and place the chain."""
        self._slots = asyncio.Semaphore(self.window)
        if self.registry is None:
            self.registry = open_registry(self.cluster.registry)
        await self.registry.start()
        if isinstance(self.registry, EmbeddedRegistry):  # nodes cannot register themselves: probe them
            self._prober = HealthProber(self.cluster, self.registry, node_credentials(self.cluster, self.name))
            await self._prober.start()
        self.coordinator = Coordinator(self.net, self.cluster, self.registry, on_plan=self._install,
                                       layout=self.layout)
        await self.coordinator.start(wait=self.start_timeout)
        if isinstance(self.layout, PlannedLayout) and self.replan:
            one_at_a_time = self.window == 1  # larger windows batch requests: a span is then a batch's
            replanner = Replanner(self.layout, self.coordinator.request_replan, lambda: dict(self._measured),
                                  measure_compute=self._compute.means if one_at_a_time else None)
            self._replanning = asyncio.get_running_loop().create_task(self._replan(replanner), name="replanner")

    async def _replan(self, replanner: Replanner) -> None:
        """Keep every link's recent bandwidth at hand (nodes report theirs through Health), and re-plan on it."""
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

    async def _install(self, placement: Placement, peers: list[NodeSpec], codec: CodecSpec | None) -> None:
        """Serve ``placement``'s first stage from now on; a hop of an older plan finishes its work, then closes."""
        if self._hop is not None and placement.version == self._version:
            if self._hop.downstream is not None:
                await self._hop.downstream.update(peers, wait=False)  # type: ignore[attr-defined]
            return
        first = placement.stages[0]
        stage = Stage(self.net, first.start, first.end,
                      policy=without_exits(self.net.policy, placement.disabled_exits)) \
            if placement.disabled_exits else self.net.stage(first.start, first.end)
        hop = stage_hop(stage, node=self.cluster.edge, cluster=self.cluster, plan_version=placement.version,
                        codec=codec, on_broken=self._broken, counters=self._sent)
        if hop.downstream is not None:
            await hop.downstream.update(peers)  # type: ignore[attr-defined]
        old, self._hop, self._version = self._hop, hop, placement.version
        self._compute.clear()  # stages change with the plan: their old spans say nothing about the new ones
        if old is not None:
            self._retired[old] = asyncio.get_running_loop().create_task(_close_when_idle(old))

    def _broken(self, name: str) -> None:
        """The stream to a first-tier node broke: route around it now (its rows are being resubmitted)."""
        if self.coordinator is not None:
            self.coordinator.node_broke(name)
        if self._prober is not None:
            self._prober.suspect(name)

    async def infer(self, x: torch.Tensor, *, index: int = -1, label: int | None = None) -> RequestRecord:
        """One input (with or without its batch dimension of 1), answered wherever it becomes confident."""
        if self._slots is None:
            raise RuntimeError("call `await entry.start()` first")
        sample = x.unsqueeze(0) if x.dim() == len(self.net.input_shape) else x
        if tuple(sample.shape[1:]) != tuple(self.net.input_shape) or sample.shape[0] != 1:
            raise ConfigError(f"submit one input of shape {tuple(self.net.input_shape)} at a time (got "
                              f"{tuple(x.shape)}); use run(dataset) for many")
        async with self._slots:
            request_id = next(self._ids)
            started = time.time()
            outcome, attempts, version = await self._answer(request_id, self.net._prepare(sample), started)
            finished = time.time()
        if isinstance(outcome, RowResult) and version == self._version:  # spans of an old plan's stages say nothing
            self._compute.record(outcome.trace)
        return _record(outcome, index=index, label=label, started=started, finished=finished, attempts=attempts)

    async def _answer(self, request_id: int, sample: torch.Tensor, started: float
                      ) -> tuple[RowResult | RowError, int, int]:
        """Send until the request is answered, or fails for a reason a retry cannot fix, or time runs out.
        Returns the outcome, the attempts, and the plan version the last attempt was sent under."""
        for attempt in itertools.count(1):
            version = self._version
            (future,) = await self._hop.send([request_id], (sample,), [])  # type: ignore[union-attr]
            outcome = await future
            if not isinstance(outcome, RowError) or outcome.code not in RETRYABLE \
                    or time.time() - started > self.cluster.retry.timeout:
                return outcome, attempt, version
            if attempt == 1:
                logger.info("request %d: %s at %s; sending it again", request_id, outcome.code, outcome.node)
            await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def run(self, dataset: Dataset, *, on_record: Callable[[RequestRecord], None] | None = None) -> RunResult:
        """Every item of ``dataset`` ((input, label) pairs or bare inputs), ``window`` in flight at a time."""
        started = time.perf_counter()
        indices = iter(range(len(dataset)))  # type: ignore[arg-type]
        records: list[RequestRecord] = []

        async def worker() -> None:
            """`window` of these share the index iterator, so no more than `window` inputs are ever pending."""
            for index in indices:
                item = dataset[index]
                x, label = (item[0], int(item[1])) if isinstance(item, (tuple, list)) else (item, None)
                record = await self.infer(x, index=index, label=label)
                records.append(record)
                if on_record is not None:
                    on_record(record)

        await asyncio.gather(*(worker() for _ in range(self.window)))
        wall = time.perf_counter() - started
        coordinator = self.coordinator
        return RunResult(sorted(records, key=lambda r: r.index), wall, await self.links(), self.placement,
                         plan_changes=list(coordinator.changes) if coordinator else [],
                         stage_shipments=list(coordinator.shipments) if coordinator else [])

    async def links(self) -> dict[str, LinkCounters]:
        """Byte counters of every link of the chain: the edge's own over every plan; those further down as the
        current plan's nodes report them through Health."""
        links = {(self.name, peer): counters for peer, counters in self._sent.items()}
        if self._hop is not None and self._hop.downstream is not None:
            reports = await self._hop.downstream.health_links()  # type: ignore[attr-defined]
            links.update({link: report.counters for link, report in reports.items()})
        return {f"{a}->{b}": counters for (a, b), counters in sorted(links.items())}

    async def link_bandwidths(self) -> dict[tuple[str, str], float]:
        """What every link of the current plan delivered lately, bits/s: the edge's own as it measures them,
        those further down as their senders report them through Health (links with too little recent
        traffic are left out)."""
        if self._hop is None or self._hop.downstream is None:
            return {}
        reports = await self._hop.downstream.health_links()  # type: ignore[attr-defined]
        return {link: r.bandwidth for link, r in reports.items() if r.bandwidth is not None}

    async def close(self) -> None:
        if self._replanning is not None:
            self._replanning.cancel()
            await asyncio.gather(self._replanning, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.close()
        if self._prober is not None:
            await self._prober.close()
        for hop, task in self._retired.items():
            if not task.done():
                task.cancel()
                await hop.close()
        if self._hop is not None:
            await self._hop.close()
        if self.registry is not None and self._own_registry:
            await self.registry.close()


async def _close_when_idle(hop: Hop, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while hop.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    await hop.close()


def _record(outcome: RowResult | RowError, *, index: int, label: int | None, started: float,
            finished: float, attempts: int) -> RequestRecord:
    latency_ms = (finished - started) * 1e3
    if isinstance(outcome, RowError):
        return RequestRecord(index, outcome.request_id, None, None, outcome.node, None, label, latency_ms,
                             error=f"{outcome.code}: {outcome.message}", attempts=attempts, finished=finished)
    return RequestRecord(index, outcome.request_id, outcome.prediction, outcome.exit, outcome.node,
                         outcome.confidence, label, latency_ms, _breakdown(outcome.trace, latency_ms),
                         attempts=attempts, finished=finished)


def _breakdown(trace: list[Stamp], latency_ms: float) -> dict[str, float]:
    """Split a request's latency by its trace: compute, queue, encode, decode per node; the rest is link."""
    first: dict[tuple[str, str], float] = {}
    for node, event, t in trace:
        first.setdefault((node, event), t)
    nodes = list(dict.fromkeys(node for node, _, _ in trace))
    parts = dict.fromkeys(BREAKDOWN, 0.0)
    for i, node in enumerate(nodes):
        def span(a: str, b: str) -> float:
            return max(0.0, first.get((node, b), 0.0) - first.get((node, a), 0.0)) \
                if (node, a) in first and (node, b) in first else 0.0
        parts["edge_compute" if i == 0 else "remote_compute"] += span("compute_start", "compute_end") * 1e3
        parts["queue"] += span("queued", "compute_start") * 1e3
        parts["encode"] += span("compute_end", "encoded") * 1e3
        parts["decode"] += span("received", "decoded") * 1e3
    parts["link"] = max(0.0, latency_ms - sum(v for k, v in parts.items() if k != "link"))
    return {k: round(v, 4) for k, v in parts.items()}


class EntryClient:
    """Synchronous use of an :class:`Entry`: a private event loop runs in a daemon thread."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, **options: object):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitexit-entry", daemon=True)
        self._thread.start()
        self.entry = self._call(self._build(net, cluster, options))

    async def _build(self, net: EarlyExitNet, cluster: ClusterSpec, options: dict) -> Entry:
        entry = Entry(net, cluster, **options)  # type: ignore[arg-type]
        await entry.start()
        return entry

    def _call(self, coroutine: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, x: torch.Tensor, *, label: int | None = None) -> Future:
        """Send one input; the Future resolves to its :class:`RequestRecord`."""
        return asyncio.run_coroutine_threadsafe(self.entry.infer(x, label=label), self._loop)

    def run(self, dataset: Dataset, **options: object) -> RunResult:
        return self._call(self.entry.run(dataset, **options))  # type: ignore[arg-type]

    def close(self) -> None:
        try:
            self._call(self.entry.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> "EntryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
