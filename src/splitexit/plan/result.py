"""What the planner answers (a plan per candidate class, the best and the baselines), and the cluster file
that serves a plan."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from splitexit.config import ClusterSpec, LinkSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut, cut_label
from splitexit.errors import ConfigError
from splitexit.links import in_series
from splitexit.plan.objective import RELATIVE_TOLERANCE, Objective
from splitexit.plan.topology import tier_groups

__all__ = ["Plan", "PlanResult", "PlannedLink", "PlannedStage", "RouteStage", "apply_plan", "describe_route"]


@dataclass(frozen=True)
class PlannedStage:
    """Tier ``tier`` runs the model from cut ``start`` to cut ``end``.

    ``compute_ms`` is the expected compute of one request that reaches the stage (slowdown and idle factor
    included): what the runtime's trace measures between a stage's ``compute_start`` and ``compute_end``.
    """

    tier: int
    nodes: tuple[str, ...]
    start: Cut
    end: Cut
    compute_ms: float = 0.0


@dataclass(frozen=True)
class PlannedLink:
    """A used link: the cut it carries (``MODEL_INPUT`` from a skipped edge), in which codec, how much per input."""

    source_tier: int
    target_tier: int
    source: str
    target: str
    cut: Cut
    codec: str
    bytes_per_input: float  # expected wire bytes per input on the way down (reach probability included)
    via: tuple[str, ...] = ()  # skipped nodes this link stands for


@dataclass(frozen=True)
class Plan:
    """Where every tier's stage starts and ends, the active exits, a codec per used link, and predictions.

    ``stages`` lists the tiers that compute, in chain order; ``skipped`` names the nodes that compute
    nothing (an empty range: a skipped edge still sends the input; skipped workers are left out).
    ``active_exits`` are the early exits evaluated; the final exit always answers. Predictions are for
    one request at a time: ``latency_ms`` is the expected end-to-end latency, ``throughput_per_s`` the
    bottleneck's capacity at ``max_batch`` rows per call.
    """

    objective: str
    stages: tuple[PlannedStage, ...]
    links: tuple[PlannedLink, ...]
    skipped: tuple[str, ...]
    active_exits: tuple[int, ...]
    latency_ms: float
    throughput_per_s: float
    accuracy: float
    exit_rates: tuple[float, ...]
    bottleneck: str
    deadline_ms: float | None = None
    label: str = ""

    @property
    def bytes_per_input(self) -> tuple[float, ...]:
        return tuple(link.bytes_per_input for link in self.links)

    @property
    def meets_deadline(self) -> bool:
        return self.deadline_ms is None or self.latency_ms <= self.deadline_ms * (1 + RELATIVE_TOLERANCE)

    @property
    def edge_computes(self) -> bool:
        return bool(self.stages) and self.stages[0].tier == 0

    def ends_at(self) -> dict[int, Cut]:
        """Per computing tier, the cut its stage ends at; ``MODEL_INPUT`` for a skipped edge."""
        ends: dict[int, Cut] = {} if self.edge_computes else {0: MODEL_INPUT}
        for stage in self.stages:
            ends[stage.tier] = stage.end
        return ends

    def describe(self) -> str:
        return describe_route(self.stages)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["describe"] = self.describe()
        data["meets_deadline"] = self.meets_deadline
        return data


@dataclass(frozen=True)
class PlanResult:
    """The best plan, the best of each other class of candidates (ranked), and the two baselines."""

    objective: Objective
    best: Plan
    candidates: tuple[Plan, ...]  # best first; one per (computing tiers, active exits) class
    edge_only: Plan
    cloud_only: Plan

    def speedup(self, baseline: Plan) -> float:
        """How much better the best plan is than ``baseline`` on the objective's own metric (>1: better)."""
        if self.objective.kind == "throughput":
            return self.best.throughput_per_s / baseline.throughput_per_s if baseline.throughput_per_s else math.inf
        return baseline.latency_ms / self.best.latency_ms if self.best.latency_ms else math.inf


def apply_plan(cluster: ClusterSpec, plan: Plan) -> ClusterSpec:
    """The cluster file that serves ``plan``: ``ends_at`` per tier, link codecs, skipped workers left out.

    Workers of skipped tiers (and of tiers after the last computing one) are dropped; the link that
    replaces a chain through them is composed (narrowest bandwidth, summed latency and jitter, combined
    loss) from the file's links along the first replica of each dropped tier. A skipped edge stays (it is
    the entry) with ``ends_at: input``: its stage is empty and the input crosses the first link.
    Active exits are not written: the cluster file has no place for them (a planned run carries them in
    its placement instead, see :func:`~splitexit.control.replan.placement_from_plan`).
    """
    groups = tier_groups(cluster)
    ends = plan.ends_at()
    computing = [s.tier for s in plan.stages]
    if not computing or computing[-1] >= len(groups):
        needed = computing[-1] + 1 if computing else 0
        raise ConfigError(f"the plan needs {needed} tiers; the cluster has {len(groups)}")
    for stage in plan.stages:
        if set(stage.nodes) != {n.name for n in groups[stage.tier]}:
            raise ConfigError(f"the plan puts a stage on {', '.join(stage.nodes)} but tier {stage.tier} of the cluster "
                              f"is {', '.join(n.name for n in groups[stage.tier])}; plan for this cluster file")
    kept = sorted({0, *computing})
    explicit_tiers = any(n.tier is not None for n in cluster.nodes)
    nodes = []
    for new_index, tier in enumerate(kept):
        for node in groups[tier]:
            end = ends.get(tier, MODEL_OUTPUT)
            update: dict[str, object] = {"ends_at": None if end is MODEL_OUTPUT else end}  # the last tier: unset
            if node.role == "worker":
                update["tier"] = new_index if explicit_tiers else None
            nodes.append(node.model_copy(update=update))
    codec_of = {(link.source_tier, link.target_tier): link.codec for link in plan.links}
    links = []
    for u, v in zip(kept, kept[1:]):
        codec = codec_of.get((u, v), cluster.codec)
        for source in groups[u]:
            for target in groups[v]:
                path = [source, *(groups[t][0] for t in range(u + 1, v)), target]
                specs = [cluster.link(a.name, b.name) for a, b in zip(path, path[1:])]
                links.append(_composed_link(source.name, target.name, specs, codec))
    data = cluster.model_dump(mode="json", by_alias=True, exclude={"nodes", "links"})
    data["nodes"] = [n.model_dump(mode="json", exclude_none=True) for n in nodes]
    data["links"] = links
    return ClusterSpec.model_validate(data)


def _composed_link(source: str, target: str, specs: Sequence[LinkSpec], codec: str) -> dict[str, object]:
    if len(specs) == 1:  # neighbours already: the file's own link, with the plan's codec
        return specs[0].model_copy(update={"codec": codec}).model_dump(mode="json", by_alias=True, exclude_none=True)
    link: dict[str, object] = {"from": source, "to": target, "codec": codec}
    figures = in_series(specs)
    link.update({name: value for name, value in figures._asdict().items() if value})
    return link


class RouteStage(Protocol):
    """A stage as a route shows it: a plan's stage and a placement's both are one."""

    @property
    def nodes(self) -> Sequence[str]: ...

    @property
    def start(self) -> Cut: ...

    @property
    def end(self) -> Cut: ...


def describe_route(stages: Iterable[RouteStage], *, compact: bool = False) -> str:
    """``edge[input..cut 3] → cloud1[cut 3..output]``; ``compact``: ``edge[in..3] cloud1[3..out]`` (tables).

    An empty stage (one that forwards the input) shows as ``edge[forwards the input]`` (``edge[fwd]``).
    """
    def bounds(s: RouteStage) -> str:
        if s.start == s.end:
            return "fwd" if compact else "forwards the input"
        return f"{cut_label(s.start, compact=compact)}..{cut_label(s.end, compact=compact)}"

    return (" " if compact else " → ").join(f"{'|'.join(s.nodes)}[{bounds(s)}]" for s in stages)
