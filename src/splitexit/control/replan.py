"""Placements chosen by the planner, from measurements, and chosen again while the entry runs.

:class:`PlanningPlacer` is the coordinator's placer when the planner decides: it plans the model on the
live nodes with the link and compute figures last measured (the cluster file's and the profile's until
then). :class:`Replanner` runs beside the entry: every ``interval`` it reads what the senders measured on
their links (the edge its own, the nodes theirs through Health) and how long each stage computed per
request, predicts the current plan and the best plan under those figures, and when the best one has been
better by ``margin`` for ``hold`` seconds, asks the coordinator to re-plan, saying why. Nodes keep the
previous plan's stages, so requests sent under it finish; the report lists every switch.

Planning is CPU work (a numpy search), so it never runs on the edge's event loop: the coordinator calls its
placer in its executor, and the re-planner plans in a thread of its own on a snapshot of the placer;
what the snapshot learned is merged back on the loop. A lock keeps the placer's state whole between them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from splitexit.config import ClusterSpec
from splitexit.control.cluster_profile import stored_link_estimates
from splitexit.cuts import MODEL_INPUT
from splitexit.model.exits import EarlyExitNet
from splitexit.plan.objective import Objective
from splitexit.plan.prediction import predict
from splitexit.plan.profile import Profile
from splitexit.plan.result import Plan
from splitexit.plan.search import plan
from splitexit.plan.topology import LinkEstimate, Topology, topology_from_cluster
from splitexit.runtime.placement import PlacedStage, Placement, versioned

__all__ = ["PlanningPlacer", "Replanner", "file_codecs", "placement_from_plan"]

logger = logging.getLogger(__name__)

#: Re-plan when another plan is predicted this much faster ...
MARGIN = 0.2
#: ... for this many seconds in a row, checking this often.
HOLD, INTERVAL = 1.0, 0.5
#: A measured bandwidth this close to the one planned with is not news.
SAME_BANDWIDTH = 0.25
#: A stage computing within this factor of its prediction is not news (predictions hold to about 20 %).
SAME_COMPUTE = 1.5


def placement_from_plan(net: EarlyExitNet, cluster: ClusterSpec, chosen: Plan) -> Placement:
    """The runtime placement that serves ``chosen`` (its ranges, codecs and active exits)."""
    tier_of = cluster.tier_by_name()
    stages: list[PlacedStage] = []
    if not chosen.edge_computes:  # cloud-only: the edge forwards the input itself
        stages.append(PlacedStage(0, (cluster.edge.name,), MODEL_INPUT, MODEL_INPUT))
    stages += [PlacedStage(tier_of[s.nodes[0]], s.nodes, s.start, s.end) for s in chosen.stages]
    codecs = tuple(link.codec for link in chosen.links) + (None,)
    disabled = frozenset(range(len(net.exit_cuts))) - set(chosen.active_exits)
    return versioned(net, tuple(stages), codecs=codecs, disabled_exits=disabled,
                     label=f"planned for {chosen.objective}", predicted_ms=chosen.latency_ms)


def file_codecs(cluster: ClusterSpec) -> tuple[str, ...] | None:
    """The codecs the planner may choose from: those the cluster file names (and raw), or any when it names
    none or says ``auto``. A file that says ``raw`` everywhere gets exact answers, planned or not."""
    named = {link.codec for link in cluster.links} | {cluster.codec}
    if "auto" in named or named == {"raw"} and not cluster.links:
        return None
    return tuple(sorted(named | {"raw"}))


def _live(cluster: ClusterSpec, live: set[str]) -> ClusterSpec:
    """The cluster with only the live nodes, each keeping the tier it has in the full file."""
    tier = cluster.tier_by_name()
    nodes = tuple(n if n.role == "edge" else n.model_copy(update={"tier": tier[n.name]})
                  for n in cluster.nodes if n.role == "edge" or n.name in live)
    return cluster.model_copy(update={"nodes": nodes})


class PlanningPlacer:
    """The coordinator's placer when the planner chooses (see the module docstring)."""

    def __init__(self, net: EarlyExitNet, profile: Profile, objective: Objective = Objective(), *,
                 codecs: tuple[str, ...] | None = None):
        self.net, self.profile, self.objective, self.codecs = net, profile, objective, codecs
        self.measured: dict[tuple[str, str], LinkEstimate] = {}
        self.slowdowns: dict[str, float] = {}  # measured: how much slower than the profile each node computes
        self.cluster: ClusterSpec | None = None  # the live cluster last planned for
        self.current: Plan | None = None
        self._lock = threading.Lock()  # the coordinator's executor and the re-planner's thread both plan

    def __call__(self, cluster: ClusterSpec, live: set[str]) -> Placement:
        """Plan for the live nodes (any thread: the work is done on a snapshot, then kept in one step)."""
        scratch = self.snapshot()
        scratch.cluster = _live(cluster, live)
        chosen = scratch.best()
        with self._lock:
            self.cluster, self.current = scratch.cluster, chosen
        logger.info("planned (%s): %s, predicted %.1f ms", self.objective.kind, chosen.describe(), chosen.latency_ms)
        return placement_from_plan(self.net, scratch.cluster, chosen)

    def snapshot(self) -> PlanningPlacer:
        """A copy to plan on in another thread: the same inputs, and measurement dicts of its own."""
        copy = PlanningPlacer(self.net, self.profile, self.objective, codecs=self.codecs)
        with self._lock:
            copy.measured, copy.slowdowns = dict(self.measured), dict(self.slowdowns)
            copy.cluster, copy.current = self.cluster, self.current
        return copy

    def learn(self, scratch: PlanningPlacer) -> None:
        """Keep what a snapshot measured."""
        with self._lock:
            self.measured.update(scratch.measured)
            self.slowdowns.update(scratch.slowdowns)

    def best(self) -> Plan:
        return plan(self.profile, self._topology(), self.objective, codecs=self.codecs).best

    def predicted_current(self) -> Plan:
        """The current plan's prediction under the latest measurements."""
        chosen = self.current
        assert chosen is not None, "plan before predicting"
        stages = [(s.tier, s.start, s.end) for s in chosen.stages]
        return predict(self.profile, self._topology(), stages, chosen.active_exits,
                       [link.codec for link in chosen.links], objective=self.objective)

    def _topology(self) -> Topology:
        assert self.cluster is not None
        return topology_from_cluster(self.cluster, measured_links=self._links(), measured_slowdowns=self.slowdowns)

    def _links(self) -> dict[tuple[str, str], LinkEstimate]:
        """Measured link figures: online (newest), else by ``splitexit profile --cluster``."""
        assert self.cluster is not None
        return {**stored_link_estimates(self.profile, self.cluster), **self.measured}

    def link(self, source: str, target: str) -> LinkEstimate:
        """The figures the plan was made with for one link: measured, else the cluster file's."""
        assert self.cluster is not None
        measured = self._links().get((source, target))
        return measured if measured is not None else LinkEstimate.from_spec(self.cluster.link(source, target))

    def slowdown(self, node: str) -> float:
        """The node's compute slowdown planned with: measured, else the cluster file's."""
        assert self.cluster is not None
        return self.slowdowns.get(node, self.cluster.node(node).slowdown)


@dataclass(frozen=True)
class _Look:
    """What one check found, worked out on a snapshot of the placer (see :meth:`Replanner.check`)."""

    scratch: PlanningPlacer
    reason: str | None = None


class Replanner:
    """Feeds measured link bandwidths and stage compute times to a :class:`PlanningPlacer` and asks for a new
    plan when it pays.

    ``measure`` gives the bits per second each measured link delivered lately, ``measure_compute`` the
    mean compute seconds per request of each node (None: compute is not measured, e.g. when batches of
    several requests make a request's compute span incomparable with the one-at-a-time prediction). Both are
    read on the caller's thread (the event loop); the planning runs in this re-planner's single thread,
    which :meth:`close` ends.
    """

    def __init__(self, placer: PlanningPlacer, request_replan: Callable[[str], None],
                 measure: Callable[[], Mapping[tuple[str, str], float]], *,
                 measure_compute: Callable[[], Mapping[str, float]] | None = None, margin: float = MARGIN,
                 hold: float = HOLD, interval: float = INTERVAL):
        self.placer, self.request_replan, self.measure = placer, request_replan, measure
        self.measure_compute = measure_compute
        self.margin, self.hold, self.interval = margin, hold, interval
        self._better_since: float | None = None
        self._news: dict[str, str] = {}  # the latest news of each link or node since another plan looked better
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replanner")

    async def run(self) -> None:
        """Check every ``interval`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_in_thread(time.monotonic())
            except Exception:  # noqa: BLE001 - a failed check must not stop serving; the next one tries again
                logger.exception("re-planning check failed")

    async def check_in_thread(self, now: float) -> str | None:
        """:meth:`check` with the planning in this re-planner's thread, so the event loop keeps serving."""
        links, compute = self._read()
        look = await asyncio.get_running_loop().run_in_executor(self._pool, self._look, now, links, compute)
        return self._conclude(look)

    def check(self, now: float) -> str | None:
        """One look at the measurements; returns the reason when it asked for a new plan."""
        return self._conclude(self._look(now, *self._read()))

    def close(self) -> None:
        """End the planning thread (a plan it is computing finishes there, unused)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read(self) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
        """The latest measurements: links' bandwidths and, if measured, nodes' compute seconds per request."""
        compute = dict(self.measure_compute()) if self.measure_compute is not None else {}
        return dict(self.measure()), compute

    def _look(self, now: float, links: Mapping[tuple[str, str], float], compute: Mapping[str, float]) -> _Look:
        """Record the news on a snapshot and compare the current plan with the best one (any thread)."""
        scratch = self.placer.snapshot()
        if scratch.cluster is None or scratch.current is None:
            return _Look(scratch)
        self._news.update(_take_links(scratch, links))
        self._news.update(_take_compute(scratch, compute))
        current = scratch.predicted_current()
        best = scratch.best()
        if best.latency_ms >= current.latency_ms * (1 - self.margin) or best.describe() == current.describe():
            self._better_since = None
            self._news = {}
            return _Look(scratch)
        if self._better_since is None:
            self._better_since = now
        if now - self._better_since < self.hold:
            return _Look(scratch)
        news, self._better_since, self._news = "; ".join(self._news.values()) or "measurements", None, {}
        return _Look(scratch, f"{news}: the current plan is now predicted at {current.latency_ms:.1f} ms, "
                              f"{best.describe()} at {best.latency_ms:.1f} ms")

    def _conclude(self, look: _Look) -> str | None:
        """Keep what the snapshot measured and ask for the new plan, unless the plan changed meanwhile."""
        self.placer.learn(look.scratch)
        if look.reason is None:
            return None
        if self.placer.current is not look.scratch.current:
            logger.info("not re-planning: the plan changed while this check computed")
            return None
        logger.info("re-planning: %s", look.reason)
        self.request_replan(look.reason)
        return look.reason


def _take_links(placer: PlanningPlacer, measured: Mapping[tuple[str, str], float]) -> dict[str, str]:
    """Record measured bandwidths that differ from what was planned with; the news, by link."""
    news = {}
    for (source, target), bandwidth in measured.items():
        planned = placer.link(source, target)
        if planned.bandwidth is not None and abs(bandwidth - planned.bandwidth) <= SAME_BANDWIDTH * planned.bandwidth:
            continue
        placer.measured[(source, target)] = replace(planned, bandwidth=bandwidth, origin="measured")
        was = "unlimited" if planned.bandwidth is None else f"{planned.bandwidth / 1e6:.3g} Mbit/s"
        news[f"{source}->{target}"] = f"{source}->{target} measured {bandwidth / 1e6:.3g} Mbit/s (was {was})"
    return news


def _take_compute(placer: PlanningPlacer, measured: Mapping[str, float]) -> dict[str, str]:
    """Record slowdowns of nodes whose stage computes far from its prediction; the news, by stage."""
    if not measured:
        return {}
    news = {}
    for stage in placer.predicted_current().stages:
        seen = [measured[n] for n in stage.nodes if n in measured]
        if not seen or stage.compute_ms <= 0:
            continue
        mean_ms = 1e3 * sum(seen) / len(seen)
        ratio = mean_ms / stage.compute_ms
        if 1 / SAME_COMPUTE <= ratio <= SAME_COMPUTE:
            continue
        for node in stage.nodes:
            placer.slowdowns[node] = placer.slowdown(node) * ratio
        name = "|".join(stage.nodes)
        news[name] = f"{name} computed {mean_ms:.3g} ms per request, predicted {stage.compute_ms:.3g} ms"
    return news
