"""The edge: runs the first stage locally, streams the rest of the chain, and collects one outcome per input.

:class:`Entry` is the asyncio implementation; :class:`EntryClient` is its one synchronous bridge (a
private event loop in a thread) with ``submit(x) -> Future`` and ``run(dataset)``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Coroutine, TypeVar

import torch
from torch.utils.data import Dataset

from splitexit.config import ClusterSpec
from splitexit.errors import ConfigError, NodeUnavailableError
from splitexit.model.exits import EarlyExitNet
from splitexit.runtime.chain import build_hop
from splitexit.runtime.hop import RowError, RowResult, Stamp
from splitexit.runtime.placement import Placement, default_placement
from splitexit.runtime.remote import LinkCounters

__all__ = ["Entry", "EntryClient", "RequestRecord", "RunResult"]

T = TypeVar("T")

#: Parts of a request's latency, in the order the report shows them.
BREAKDOWN = ("edge_compute", "encode", "link", "queue", "remote_compute", "decode")


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


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_s: float
    links: dict[str, LinkCounters]
    placement: Placement


class Entry:
    """Runs stage 0 of the placement here and sends what stays unconfident down the chain."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, *, placement: Placement | None = None,
                 window: int | None = None):
        self.net, self.cluster = net, cluster
        self.placement = placement or default_placement(net, cluster)
        self.window = window or cluster.window
        self.name = cluster.nodes[0].name
        self.hop, self.remote = build_hop(net, cluster, self.placement, self.name)
        self._ids = itertools.count(1)
        self._slots: asyncio.Semaphore | None = None

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.window)
        if self.remote is not None:
            await self.remote.connect()

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
            (future,) = await self.hop.send([request_id], (self.net._prepare(sample),), [])
            outcome = await future
            finished = time.time()
        return _record(outcome, index=index, label=label, started=started, finished=finished)

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
        links = {f"{self.name}->{self.remote.target.name}": self.remote.counters} if self.remote else {}
        if self.remote is not None:
            links.update(await self._downstream_links())
        return RunResult(sorted(records, key=lambda r: r.index), wall, links, self.placement)

    async def _downstream_links(self) -> dict[str, LinkCounters]:
        """Byte counters of the hops past the first, as the nodes report them through Health."""
        try:
            reply = await self.remote.health()  # type: ignore[union-attr]
        except NodeUnavailableError:  # counters are a nicety; a report without them is still right
            return {}
        return {f"{l.source}->{l.target}": LinkCounters(l.raw_bytes, l.wire_bytes, l.messages, l.rows)
                for l in reply.links}

    async def close(self) -> None:
        await self.hop.close()


def _record(outcome: RowResult | RowError, *, index: int, label: int | None, started: float,
            finished: float) -> RequestRecord:
    latency_ms = (finished - started) * 1e3
    if isinstance(outcome, RowError):
        return RequestRecord(index, outcome.request_id, None, None, outcome.node, None, label, latency_ms,
                             error=f"{outcome.code}: {outcome.message}")
    return RequestRecord(index, outcome.request_id, outcome.prediction, outcome.exit, outcome.node,
                         outcome.confidence, label, latency_ms, _breakdown(outcome.trace, latency_ms))


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
