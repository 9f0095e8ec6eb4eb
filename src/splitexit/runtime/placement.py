"""Which tier runs which range of cuts: the placement the cluster file implies (`run --no-plan`), and the
versioned :class:`Placement` every placer produces (the planner's comes from ``control/replan.py``).

"Which node runs what" is said three ways, from the planner down to one node::

    Plan                 plan/result.py     what the planner chose and predicts: a PlannedStage per
     |                                      computing tier (cuts, nodes), a PlannedLink per used link
     |  placement_from_plan                 (control/replan.py)
     v
    Placement            this module        what the chain serves under one version: a PlacedStage per
     |                                      tier (cuts, replicas), a codec per link, exits switched off
     |  Coordinator._assign_all             (control/coordinator.py; the edge runs the first stage itself)
     v
    Assignment           runtime/control_messages.py   what one worker is told: its stage file, the next
                                                       tier's replicas and the codec to them, who may send

A :data:`~splitexit.control.coordinator.Placer` makes the Placement for the nodes that are live:
:func:`default_placement` (the cluster file's) or a :class:`~splitexit.control.replan.PlanningPlacer`.
Cuts are :mod:`splitexit.cuts` values everywhere: ids, ``MODEL_INPUT`` and ``MODEL_OUTPUT``.

Tiers take the chain in order: the edge is tier 0, and the workers of one tier are replicas of one stage.
Only tiers with a live node get a stage; a tier that has lost every node is left out and its neighbours
take over its range. A tier's stage ends where the cluster file says (``ends_at``), or by default at an
exit: the package's exits are spread over the tiers, one per tier where possible. With more tiers than
exits, extra cuts split the most expensive remaining range at its FLOP midpoint.

The ``version`` hashes the package's weights with the ranges, codecs and disabled exits, not with the
replicas: a replica joining or leaving changes where rows go, not what any stage computes, so work in
flight stays valid.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from splitexit.config import ClusterSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut, cut_order
from splitexit.errors import ClusterError, CutError
from splitexit.model.exits import EarlyExitNet
from splitexit.plan.result import describe_route

__all__ = ["Placement", "PlacedStage", "default_placement", "versioned"]


@dataclass(frozen=True)
class PlacedStage:
    """Tier ``tier``'s replicas run the model from ``start`` to ``end`` (an edge that forwards the input:
    ``MODEL_INPUT`` to ``MODEL_INPUT``)."""

    tier: int
    nodes: tuple[str, ...]  # the replicas serving this stage (the edge's stage: the edge alone)
    start: Cut
    end: Cut


@dataclass(frozen=True)
class Placement:
    """The chain under one version: see the module docstring."""

    stages: tuple[PlacedStage, ...]
    version: int
    codecs: tuple[str | None, ...] = ()  # per stage, its outgoing link's codec (empty: the cluster file's)
    disabled_exits: frozenset[int] = frozenset()  # early exits not evaluated (their heads do not run)
    label: str = ""  # where the placement came from, for logs and the report
    #: the planner's expected latency for it (None: not planned); not part of what the placement is
    predicted_ms: float | None = field(default=None, compare=False)

    def codec_after(self, stage: PlacedStage) -> str | None:
        return self.codecs[self.stages.index(stage)] if self.codecs else None

    def stage_of(self, node: str) -> PlacedStage:
        for stage in self.stages:
            if node in stage.nodes:
                return stage
        raise ClusterError(f"node {node!r} has no stage in this placement ({self.describe()})")

    def after(self, stage: PlacedStage) -> PlacedStage | None:
        index = self.stages.index(stage)
        return self.stages[index + 1] if index + 1 < len(self.stages) else None

    def before(self, stage: PlacedStage) -> PlacedStage | None:
        index = self.stages.index(stage)
        return self.stages[index - 1] if index > 0 else None

    def describe(self) -> str:
        route = describe_route(self.stages)
        if any(self.codecs):
            route += " (codecs " + ", ".join(c for c in self.codecs if c) + ")"
        if self.disabled_exits:
            route += f" (exits {', '.join(map(str, sorted(self.disabled_exits)))} off)"
        return route


def default_placement(net: EarlyExitNet, cluster: ClusterSpec, live: Collection[str] | None = None) -> Placement:
    """One stage per tier of ``cluster`` that has a node in ``live`` (default: every node of the file).

    See the module docstring for where stages end and what the version covers.
    """
    tiers = [[n for n in members if live is None or n.name in live or n.role == "edge"]
             for members in cluster.tiers().values()]
    configured = [next((n.ends_at for n in members if n.ends_at is not None), None)
                  for members in cluster.tiers().values()]
    configured = [end for end, members in zip(configured, tiers) if members]
    tiers = [members for members in tiers if members]
    ends = _ends(net, configured[:-1], len(tiers))
    if len(ends) != len(tiers) - 1 or list(ends) != sorted(set(ends), key=cut_order):
        raise ClusterError(f"cannot give each of the {len(tiers)} tiers a stage: stage ends {ends} must be "
                           f"{len(tiers) - 1} distinct cuts in forward order; fix `ends_at` in the cluster file")
    tier_of = cluster.tier_by_name()
    bounds: list[Cut] = [MODEL_INPUT, *ends, MODEL_OUTPUT]
    stages = tuple(PlacedStage(tier_of[members[0].name], tuple(n.name for n in members), a, b)
                   for members, a, b in zip(tiers, bounds[:-1], bounds[1:]))
    return versioned(net, stages, label="cluster file")


def versioned(net: EarlyExitNet, stages: tuple[PlacedStage, ...], *, codecs: tuple[str | None, ...] = (),
              disabled_exits: frozenset[int] = frozenset(), label: str = "",
              predicted_ms: float | None = None) -> Placement:
    """A placement whose version hashes what its stages compute (weights, ranges, codecs, exits)."""
    layout = ([(s.tier, s.start, s.end) for s in stages], codecs, sorted(disabled_exits))
    digest = hashlib.sha256(repr((net.weights_sha256, layout)).encode())
    return Placement(stages, int.from_bytes(digest.digest()[:8], "big") >> 1, codecs, disabled_exits, label,
                     predicted_ms)


def _ends(net: EarlyExitNet, explicit: list[int | str | None], stages: int) -> Sequence[Cut]:
    """Where each stage but the last ends: the cluster file's ``ends_at``, or spread over the exits."""
    wanted = stages - 1
    if any(e is not None for e in explicit):
        if any(e is None for e in explicit):
            raise ClusterError("set `ends_at` on every tier but the last, or on none of them")
        try:
            return [MODEL_INPUT if e is MODEL_INPUT else net.graph.resolve(e).id for e in explicit if e is not None]
        except CutError as exc:
            raise ClusterError(f"cluster file: {exc}") from exc
    exits = [c.id for c in net.exit_cuts]
    if len(exits) >= wanted:
        picks = sorted({min(len(exits) - 1, math.ceil((i + 1) * (len(exits) + 1) / stages) - 1)
                        for i in range(wanted)})
        if len(picks) == wanted:
            return [exits[p] for p in picks]
        return exits[-wanted:] if wanted else []
    ends = list(exits)
    while len(ends) < wanted:
        extra = _split_heaviest(net, ends)
        if extra is None:
            raise ClusterError(f"the model has too few cut points for {stages} tiers; use fewer tiers")
        ends = sorted([*ends, extra])
    return ends


def _split_heaviest(net: EarlyExitNet, ends: list[int]) -> int | None:
    """A cut near the FLOP midpoint of the most expensive range between current boundaries."""
    graph = net.graph
    flops = {c.id: c.flops_before for c in graph.cut_points}
    edges = [0.0, *(flops[e] for e in ends), float(graph.total_flops)]
    ranges = sorted(range(len(edges) - 1), key=lambda i: edges[i + 1] - edges[i], reverse=True)
    for i in ranges:
        low, high = edges[i], edges[i + 1]
        middle = (low + high) / 2
        inside = [c for c in graph.cut_points if low < c.flops_before < high and c.id not in ends]
        if inside:
            return min(inside, key=lambda c: (abs(c.flops_before - middle), c.bytes_per_sample)).id
    return None
