"""The Prometheus series of one member of a chain (a worker node or the edge), in a registry of its own.

Names follow Prometheus' conventions (base units; ``_total``, ``_seconds``, ``_bytes``); every series
carries the member's name as ``node``, so one dashboard shows nodes and edges side by side.
``docs/metrics.md`` lists them. Events (rows, exits, batches, refusals) are counted as they happen, from
any thread; what is state (queue depth, rows in flight, the plan served, bytes each outgoing link carried,
plan changes) is read from the member on its own event loop when the page is scraped (:class:`LiveState`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitexit.about import installed_version

__all__ = ["ChainMetrics", "LinkBytes", "LiveState"]

logger = logging.getLogger(__name__)

#: Seconds: a row's time in a member (at the edge: a request's, from submission to answer).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds: one micro-batch's stage compute.
COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Rows in one micro-batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: What became of a row in a member.
ROW_OUTCOMES = ("answered", "forwarded", "refused", "failed")
#: Seconds a scrape waits for the member's event loop to report its state.
SNAPSHOT_TIMEOUT = 2.0
#: Distinct error codes kept as label values; codes past these (or not snake_case) count as ``other``.
MAX_CODES = 32
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


#: No ``<counter>_created`` gauge beside every counter: in the text format it is one more series per counter
#: that dashboards never read (process-wide, as prometheus_client offers it).
disable_created_metrics()


class LinkBytes(Protocol):
    """What one outgoing link carried since the member started (``runtime/remote.py`` ``LinkCounters``, which
    this module cannot import: the executor below it imports this one)."""

    raw_bytes: int
    wire_bytes: int
    messages: int


@dataclass(frozen=True)
class LiveState:
    """The member's state as a scrape reads it (on the member's event loop)."""

    queued: int  # jobs waiting for a stage's thread
    in_flight: int  # rows accepted and not yet answered (at the edge: requests)
    plan: int  # version of the newest plan served (0: none yet)
    links: Mapping[str, LinkBytes] = field(default_factory=dict)  # by target
    plan_changes: Mapping[str, int] = field(default_factory=dict)  # the edge: plans installed, by cause
    stage_shipped: Mapping[str, int] = field(default_factory=dict)  # the edge: stage-file bytes sent, by target


class ChainMetrics:
    """Every series of one member; :meth:`watch` hands it the function that reads the member's state."""

    def __init__(self, node: str, *, role: str = "worker", tier: int = 0):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        edge, worker = (r, None) if role == "edge" else (None, r)  # a series of the other role is not exposed
        rows = Counter("splitexit_rows", "Rows this member handled, by what became of them here: answered by "
                       "one of its exits, forwarded to the next tier, refused as malformed, failed",
                       ["node", "outcome"], registry=r)
        self._rows = {outcome: rows.labels(node=node, outcome=outcome) for outcome in ROW_OUTCOMES}
        self._exits_by_index: dict[int, Counter] = {}  # the labelled child per exit index, made once
        self._exits = Counter("splitexit_exits", "Rows answered by each of this member's exits (the exit's index "
                              "in the model)", ["node", "exit"], registry=r)
        self._latency = Histogram("splitexit_latency_seconds", "Seconds from a row's arrival here to its answer "
                                  "leaving (the rest of the chain included); at the edge, from a request's "
                                  "submission to its answer", ["node"], buckets=LATENCY_BUCKETS,
                                  registry=r).labels(node=node)
        self._compute = Histogram("splitexit_stage_compute_seconds", "Seconds of stage compute per micro-batch "
                                  "(slowdown included)", ["node"], buckets=COMPUTE_BUCKETS,
                                  registry=r).labels(node=node)
        self._batch_rows = Histogram("splitexit_batch_rows", "Rows per micro-batch the stage computed", ["node"],
                                     buckets=BATCH_BUCKETS, registry=r).labels(node=node)
        self._refusals = Counter("splitexit_refusals", "Connections and batches refused, by reason", ["node", "reason"],
                                 registry=r)
        self._plans = Counter("splitexit_plans_assigned", "Plans the coordinator assigned this member", ["node"],
                              registry=worker).labels(node=node)
        self._stage_received = Counter("splitexit_stage_received_bytes", "Bytes of stage files uploaded to this "
                                       "member", ["node"], registry=worker).labels(node=node)
        self._requests = Counter("splitexit_requests", "Requests the edge finished, by outcome: answered, or the "
                                 "error code they failed with", ["node", "outcome"], registry=edge)
        self._resubmissions = Counter("splitexit_resubmissions", "Times the edge sent a request again (a node "
                                      "was lost, or an attempt timed out)", ["node"], registry=edge).labels(node=node)
        self._codes: set[str] = set()
        self.role, self.tier = role, tier
        self._live: _Live | None = None

    # ------------------------------------------------------------------ events (any thread)
    def rows(self, outcome: str, count: int = 1) -> None:
        """``count`` rows of ``outcome`` (one of :data:`ROW_OUTCOMES`)."""
        if count:
            self._rows[outcome].inc(count)

    def answered(self, exits: Iterable[int]) -> None:
        """Rows answered here, one per exit index given."""
        count = 0
        for exit_ in exits:
            child = self._exits_by_index.get(exit_)
            if child is None:
                child = self._exits_by_index[exit_] = self._exits.labels(node=self.node, exit=str(exit_))
            child.inc()
            count += 1
        self.rows("answered", count)

    def latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def batch(self, rows: int, compute_s: float) -> None:
        """One micro-batch computed (called from the stage's thread)."""
        self._batch_rows.observe(rows)
        self._compute.observe(compute_s)

    def refused(self, reason: str) -> None:
        """A connection or a batch refused; ``reason`` is one of our own codes (``docs/security.md``)."""
        self._refusals.labels(node=self.node, reason=self._bounded(reason)).inc()

    def plan_assigned(self) -> None:
        self._plans.inc()

    def stage_received(self, size: int) -> None:
        self._stage_received.inc(size)

    def request(self, outcome: str, attempts: int) -> None:
        """The edge finished a request (``answered`` or its error code) after ``attempts`` sends."""
        self._requests.labels(node=self.node, outcome=self._bounded(outcome)).inc()
        if attempts > 1:
            self._resubmissions.inc(attempts - 1)

    def _bounded(self, code: str) -> str:
        """A label value from a code, which may come from another node: bounded in form and in number."""
        if code in self._codes:
            return code
        if not _CODE.match(code) or len(self._codes) >= MAX_CODES:
            return "other"
        self._codes.add(code)
        return code

    # ------------------------------------------------------------------ state (read when scraped)
    def watch(self, read: Callable[[], LiveState], loop: asyncio.AbstractEventLoop) -> None:
        """Report ``read()``'s state on every scrape; ``read`` runs on ``loop`` (the member's event loop)."""
        if self._live is None:
            self._live = _Live(self, read, loop)
            self.registry.register(self._live)
        else:
            self._live.read, self._live.loop = read, loop


class _Live(Collector):
    """The state series, built at scrape time from one :class:`LiveState` taken on the member's loop."""

    def __init__(self, metrics: ChainMetrics, read: Callable[[], LiveState], loop: asyncio.AbstractEventLoop):
        self.metrics, self.read, self.loop = metrics, read, loop

    def collect(self) -> Iterable[Metric]:
        node = self.metrics.node
        role, tier = self.metrics.role, str(self.metrics.tier)
        info = GaugeMetricFamily("splitexit_node_info", "This member: its role, tier and splitexit version",
                                 labels=["node", "role", "tier", "version"])
        info.add_metric([node, role, tier, installed_version()], 1)
        yield info
        state = self._snapshot()
        if state is None:
            return
        yield _gauge("splitexit_queue_depth", "Jobs waiting for a stage's thread", node, state.queued)
        yield _gauge("splitexit_in_flight_rows", "Rows accepted and not yet answered (at the edge: requests)", node,
                     state.in_flight)
        plan = GaugeMetricFamily("splitexit_plan_info", "The newest plan this member serves (its id as a string: "
                                 "ids exceed what a float holds exactly)", labels=["node", "plan"])
        if state.plan:
            plan.add_metric([node, str(state.plan)], 1)
        yield plan
        for name, help_, pick in (
                ("splitexit_link_raw_bytes", "Bytes of tensors sent on each outgoing link, before encoding",
                 lambda t: t.raw_bytes),
                ("splitexit_link_wire_bytes", "Bytes sent on each outgoing link as framed on the wire (encoded, "
                 "compressed)", lambda t: t.wire_bytes),
                ("splitexit_link_messages", "Batches sent on each outgoing link", lambda t: t.messages)):
            family = CounterMetricFamily(name, help_, labels=["node", "target"])
            for target, totals in sorted(state.links.items()):
                family.add_metric([node, target], pick(totals))
            yield family
        if role == "edge":
            changes = CounterMetricFamily("splitexit_plan_changes", "Plans the edge's coordinator installed, by "
                                          "cause: start, membership (a node left, joined or broke), measured (the "
                                          "re-planner found a better plan), refused (a node refused its stage)",
                                          labels=["node", "cause"])
            for cause, count in sorted(state.plan_changes.items()):
                changes.add_metric([node, cause], count)
            yield changes
            shipped = CounterMetricFamily("splitexit_stage_shipped_bytes", "Bytes of stage files the coordinator "
                                          "uploaded, by receiving node", labels=["node", "target"])
            for target, size in sorted(state.stage_shipped.items()):
                shipped.add_metric([node, target], size)
            yield shipped

    def _snapshot(self) -> LiveState | None:
        async def read() -> LiveState:
            return self.read()

        try:
            return asyncio.run_coroutine_threadsafe(read(), self.loop).result(SNAPSHOT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a busy or closed loop: the event series still go out
            logger.warning("metrics of %s: no state within %g s (%s); serving the event counts only",
                           self.metrics.node, SNAPSHOT_TIMEOUT, type(exc).__name__)
            return None


def _gauge(name: str, help_: str, node: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_, labels=["node"])
    family.add_metric([node], value)
    return family
