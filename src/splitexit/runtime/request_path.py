"""The edge's request path: run the current plan's first stage here, send the rest on, resubmit lost work.

The path owns every request until its answer arrives: it keeps the input, and when the request's rows
were lost with a node (``node_unavailable``), found no route (``no_route``) or reached a node that has not
got the current plan yet (``unknown_plan``), it sends the input again, under the same id, along whatever
route has been installed by then. A request is answered exactly once; a late duplicate of an answer is
dropped by id where it arrives. With the cluster file's ``fallback``, a request whose route still fails when
90% of ``retry.timeout`` has passed is answered at the edge instead (``fallback.py``), and its record says
why.

Which plan runs is decided above this module (``control/edge.py`` wires the coordinator to
:meth:`RequestPath.install`); nothing here knows of registries or coordinators, so the path can be driven
in one process with in-memory downstreams.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import cast

import torch
from torch.utils.data import Dataset

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.codec_names import CodecSpec
from splitexit.errors import ConfigError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stage_file import without_exits
from splitexit.model.stages import Stage
from splitexit.runtime.devices import choose_device
from splitexit.runtime.failover import Backoff
from splitexit.runtime.fallback import Fallback, fallback_stage
from splitexit.runtime.hop import Hop, RowError, RowResult
from splitexit.runtime.meter import ComputeMeter
from splitexit.runtime.metrics import ChainMetrics
from splitexit.runtime.placement import Placement
from splitexit.runtime.records import RequestRecord, request_record
from splitexit.runtime.remote import LinkCounters
from splitexit.runtime.replicas import ReplicaSet
from splitexit.runtime.stage_hop import NextStage, OpenNextStage, stage_hop

__all__ = ["EXPIRED", "FALLS_BACK", "REMOTE_SHARE", "RETIRE_TIMEOUT", "RETRYABLE", "RequestPath"]

logger = logging.getLogger(__name__)

#: Outcomes that say "this route failed", not "this input is bad": the path sends the input again.
RETRYABLE = frozenset({"node_unavailable", "no_route", "unknown_plan"})
#: An attempt that got no answer in time: sent again while the request's deadline allows.
EXPIRED = "attempt_expired"
#: Seconds a hop of an earlier plan may keep finishing its requests before it is closed anyway.
RETIRE_TIMEOUT = 30.0
#: Outcomes the edge answers itself when the cluster file has a ``fallback``: the route, not the input, failed.
FALLS_BACK = frozenset({*RETRYABLE, EXPIRED, "deadline_exceeded", "overloaded"})
#: With a fallback, the share of ``retry.timeout`` the chain gets; the rest is left for the edge to answer.
REMOTE_SHARE = 0.9


class RequestPath:
    """Sends each input through the edge's hop of the current plan until it is answered."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, *, window: int,
                 on_broken: Callable[[str], None] | None = None, open_next: OpenNextStage = ReplicaSet,
                 clock: Callable[[], float] = time.monotonic, metrics: ChainMetrics | None = None):
        """``open_next`` opens each plan's connections to the next stage (default: data-plane replicas);
        ``clock`` is what request deadlines are measured with; ``metrics`` counts requests, and the edge
        stage's rows and batches."""
        self.net, self.cluster, self.window = net, cluster, window
        self.name = cluster.edge.name
        self.retry = Backoff(cluster.retry.first_wait, cluster.retry.max_wait)
        self.compute = ComputeMeter()  # how long each node's stage computed per request, under this plan
        self.device = choose_device(cluster.edge.device, cluster.edge.dtype, member=f"the edge {self.name}",
                                    compile=cluster.edge.compile, pin_memory=cluster.edge.pin_memory)
        self._computing = self.device.copy_for(net)  # what the edge's stages run: net itself on the CPU
        self.metrics = metrics or ChainMetrics(self.name, role="edge")
        self.in_flight = 0  # requests submitted and not yet answered
        self._on_broken, self._open_next, self._clock = on_broken, open_next, clock
        self._hop: Hop | None = None
        self._fallback: Fallback | None = None  # what answers a request the chain could not, under this plan
        self._version = 0
        self._retired: dict[Hop, asyncio.Task] = {}  # hops of earlier plans, closing once their requests finish
        self._sent: dict[str, LinkCounters] = {}  # bytes the edge sent to each peer, over every plan
        self._ids = itertools.count(1)
        self._slots = asyncio.Semaphore(window)

    @property
    def hop(self) -> Hop | None:
        """The edge's hop of the current plan (None before the first :meth:`install`)."""
        return self._hop

    @property
    def sent(self) -> dict[str, LinkCounters]:
        """Bytes the edge sent to each peer, over every plan."""
        return self._sent

    async def install(self, placement: Placement, peers: list[NodeSpec], codec: CodecSpec | None) -> None:
        """Serve ``placement``'s first stage from now on; a hop of an older plan finishes its work, then closes."""
        if self._hop is not None and placement.version == self._version:
            if (replicas := _replicas(self._hop)) is not None:
                await replicas.update(peers, wait=False)
            return
        first = placement.stages[0]
        net = self._computing
        stage = Stage(net, first.start, first.end, policy=without_exits(net.policy, placement.disabled_exits)) \
            if placement.disabled_exits else net.stage(first.start, first.end)
        if self.device.compile != "off":  # compiling takes the CPU for a while: not on the loop
            stage = await asyncio.to_thread(self.device.prepared, stage, self.cluster.batching.max_batch)
        hop = stage_hop(stage, node=self.cluster.edge, cluster=self.cluster, plan_version=placement.version,
                        codec=codec, on_broken=self._on_broken, counters=self._sent,
                        open_next=self._open_next, metrics=self.metrics, compute=self.device)
        if (replicas := _replicas(hop)) is not None:
            await replicas.update(peers)
        fallback = fallback_stage(net, first.end, self.cluster.fallback)
        self._fallback = Fallback(fallback, self.device, node=self.name) if fallback is not None else None
        old, self._hop, self._version = self._hop, hop, placement.version
        self.compute.clear()  # stages change with the plan: their old spans say nothing about the new ones
        if old is not None:
            self._retired[old] = asyncio.get_running_loop().create_task(old.close_when_idle(RETIRE_TIMEOUT))

    async def infer(self, x: torch.Tensor, *, index: int = -1, label: int | None = None) -> RequestRecord:
        """One input (with or without its batch dimension of 1), answered wherever it becomes confident."""
        if self._hop is None:
            raise RuntimeError("no plan is installed yet: call `await entry.start()` first")
        sample = x.unsqueeze(0) if x.dim() == len(self.net.input_shape) else x
        if tuple(sample.shape[1:]) != tuple(self.net.input_shape) or sample.shape[0] != 1:
            raise ConfigError(f"submit one input of shape {tuple(self.net.input_shape)} at a time (got "
                              f"{tuple(x.shape)}); use run(dataset) for many")
        async with self._slots:
            request_id = next(self._ids)
            started, since = time.time(), time.perf_counter()
            self.in_flight += 1
            try:
                prepared = self.net._prepare(sample)
                outcome, attempts, version = await self._answer(request_id, prepared)
                fallback_reason = None
                if isinstance(outcome, RowError) and outcome.code in FALLS_BACK and self._fallback is not None:
                    fallback_reason = f"{outcome.code}: {outcome.message}"
                    outcome = await self._fallback.answer(request_id, prepared)
            finally:
                self.in_flight -= 1
            finished = time.time()
        self.metrics.request(("fallback" if fallback_reason else "answered") if isinstance(outcome, RowResult)
                             else outcome.code, attempts)
        if isinstance(outcome, RowResult):
            self.metrics.latency(time.perf_counter() - since)
        if isinstance(outcome, RowResult) and version == self._version:  # spans of an old plan's stages say nothing
            self.compute.record(outcome.trace)
        return request_record(outcome, index=index, label=label, started=started, finished=finished,
                              attempts=attempts, plan=version, fallback=fallback_reason)

    async def _answer(self, request_id: int, sample: torch.Tensor) -> tuple[RowResult | RowError, int, int]:
        """Send until the request is answered, or fails for a reason a retry cannot fix, or ``retry.timeout``
        runs out. An attempt that gets no answer within ``retry.attempt_timeout`` is sent again (under the
        same id: whichever answer comes first is the one). Deadlines are on the monotonic clock, so a step of
        the wall clock changes nothing. Returns the outcome, the attempts, and the plan version the last
        attempt was sent under."""
        retry = self.cluster.retry
        deadline = self._clock() + retry.timeout * (REMOTE_SHARE if self._fallback is not None else 1.0)
        failure: RowError | None = None  # the last attempt that failed with a reason (not just no answer in time)
        for attempt in itertools.count(1):
            version, hop = self._version, self._hop  # each attempt takes the route installed by then
            assert hop is not None  # infer() checked, and install() never unsets it
            within = min(retry.attempt_timeout, deadline - self._clock())
            outcome = await self._attempt(hop, request_id, sample, within)
            left = deadline - self._clock()
            if isinstance(outcome, RowError) and outcome.code == EXPIRED and left <= 0:
                if failure is not None:  # the time ran out during a retry: the reason the retries began says more
                    return failure, attempt, version
                expired = RowError(request_id, "deadline_exceeded", f"no answer within retry.timeout "
                                   f"({retry.timeout:g} s, {attempt} attempts): a node on the route may be stalled",
                                   self.name)
                return expired, attempt, version
            if isinstance(outcome, RowError) and outcome.code != EXPIRED:
                failure = outcome
            if not isinstance(outcome, RowError) or outcome.code not in (*RETRYABLE, EXPIRED) or left <= 0:
                return outcome, attempt, version
            if attempt == 1:
                logger.info("request %d: %s at %s; sending it again", request_id, outcome.code, outcome.node)
            await asyncio.sleep(min(self.retry.delay(attempt), left))
            if self._clock() >= deadline:  # the wait used up the time: the last failure is the answer
                return outcome, attempt, version
        raise AssertionError("unreachable")

    async def _attempt(self, hop: Hop, request_id: int, sample: torch.Tensor, within: float) -> RowResult | RowError:
        """One send and its answer, or an ``EXPIRED`` error after ``within`` seconds. A send that has not
        finished by then (a stalled peer holds its stream) is left to finish in the background, never
        cancelled half-way through a batch."""
        sending = asyncio.ensure_future(hop.send([request_id], (sample,), []))
        try:
            async with asyncio.timeout(max(within, 0.0)):
                (future,) = await asyncio.shield(sending)
                outcome: RowResult | RowError = await asyncio.shield(future)
                return outcome
        except TimeoutError:
            sending.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, not logged
            return RowError(request_id, EXPIRED, f"no answer within {within:.3g} s", self.name)

    async def run(self, dataset: Dataset, *, on_record: Callable[[RequestRecord], None] | None = None
                  ) -> list[RequestRecord]:
        """Every item of ``dataset`` ((input, label) pairs or bare inputs), ``window`` in flight at a time;
        the records in dataset order."""
        indices = iter(range(len(dataset)))  # type: ignore[arg-type]  # torch's Dataset declares no __len__
        records: list[RequestRecord] = []

        async def worker() -> None:
            """`window` of these share the index iterator, so no more than `window` inputs are ever pending."""
            for index in indices:
                item = dataset[index]
                if isinstance(item, (tuple, list)):  # (input, label), or (input,) from a TensorDataset of inputs
                    x, label = item[0], int(item[1]) if len(item) > 1 else None
                else:
                    x, label = item, None
                record = await self.infer(x, index=index, label=label)
                records.append(record)
                if on_record is not None:
                    on_record(record)

        await asyncio.gather(*(worker() for _ in range(self.window)))
        return sorted(records, key=lambda r: r.index)

    async def links(self) -> dict[str, LinkCounters]:
        """Byte counters of every link of the chain: the edge's own over every plan; those further down as the
        current plan's nodes report them through Health."""
        links = {(self.name, peer): counters for peer, counters in self._sent.items()}
        if self._hop is not None and (replicas := _replicas(self._hop)) is not None:
            reports = await replicas.health_links()
            links.update({link: report.counters for link, report in reports.items()})
        return {f"{a}->{b}": counters for (a, b), counters in sorted(links.items())}

    async def link_bandwidths(self) -> dict[tuple[str, str], float]:
        """What every link of the current plan delivered lately, bits/s: the edge's own as it measures them,
        those further down as their senders report them through Health (links with too little recent
        traffic are left out)."""
        if self._hop is None or (replicas := _replicas(self._hop)) is None:
            return {}
        reports = await replicas.health_links()
        return {link: r.bandwidth for link, r in reports.items() if r.bandwidth is not None}

    async def close(self) -> None:
        for hop, task in self._retired.items():
            if not task.done():
                task.cancel()
                await hop.close()
        if self._hop is not None:
            await self._hop.close()


def _replicas(hop: Hop) -> NextStage | None:
    """The next stage's replicas behind the edge's hop (None when the edge's stage ends at the model output)."""
    return cast(NextStage | None, hop.downstream)  # stage_hop gives every forwarding hop a NextStage
