"""The planner's search: the exact best plan for an objective, over every class of candidates. Pure: no I/O,
no clocks, deterministic.

A candidate gives every tier of the chain a contiguous range of the model's candidate cuts — possibly
empty, in which case the tier is *skipped* (see :mod:`splitexit.plan.topology`) — plus a set of active
early exits (the final exit always answers) and a codec per used link. Its costs are those of
:mod:`splitexit.plan.costs`.

For every class of candidates (which tiers compute x which early exits are active) a dynamic programme
over (tier, cut) finds the best cuts and codecs — additive for latency, min-max for throughput (then,
among candidates of that throughput, the lowest latency). The deadline objective keeps the classes whose
best latency meets the deadline and takes the most accurate, ties by latency. Lossy codecs are treated as
free of accuracy loss; pass ``codecs`` to restrict the choice, e.g. to raw ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from splitexit.errors import ConfigError
from splitexit.plan.costs import INPUT_POSITION, CostTables, cut_at
from splitexit.plan.objective import RELATIVE_TOLERANCE, Objective
from splitexit.plan.prediction import Candidate, Factors, Gaps, StageCuts, evaluate, settle_idle_factors
from splitexit.plan.profile import Profile
from splitexit.plan.result import Plan, PlanResult
from splitexit.plan.topology import Topology, visited_tiers

__all__ = ["DEFAULT_TOP", "plan"]

#: Candidate classes a result lists besides the best.
DEFAULT_TOP = 5
#: Absolute slack on a capped load, for loads that are zero.
_LOAD_FLOOR = 1e-15


def plan(profile: Profile, topology: Topology, objective: Objective = Objective(), *,
         codecs: Sequence[str] | None = None, exit_sets: Iterable[Sequence[int]] | None = None,
         edge_may_skip: bool = True, top: int = DEFAULT_TOP) -> PlanResult:
    """The exact best plan for ``objective``, the best of the other candidate classes, and the baselines.

    A class is (which tiers compute, which early exits are active). ``exit_sets`` restricts the active exit
    sets tried (default: every subset of the exits that can fire). ``edge_may_skip=False`` leaves out the
    classes where the edge computes nothing (the runtime serves those too: the edge then ships the input
    unprocessed); the cloud-only baseline is searched all the same. Deterministic.
    """
    costs = CostTables(profile, topology, codecs)
    usable = profile.exits.usable()
    if exit_sets is None:
        sets = [s for r in range(len(usable) + 1) for s in itertools.combinations(usable, r)]
    else:
        sets = [tuple(sorted(set(s))) for s in exit_sets]
        early = profile.exits.early_exits
        if any(not 0 <= j < early for s in sets for j in s) or not sets:
            raise ConfigError(f"exit sets must be non-empty lists of early exits 0..{early - 1}, got {sets}")
    count = len(topology.tiers)
    classes = [tiers for r in range(1, count + 1) for tiers in itertools.combinations(range(count), r)
               if edge_may_skip or tiers[0] == 0]
    plans = [p for tiers in classes for active in sets
             for p in [_class_best(costs, tiers, active, objective)] if p is not None]
    if not plans:
        raise ConfigError("no candidate plan exists for this profile and cluster")
    ranked = sorted(plans, key=lambda p: _rank(p, objective))
    best = replace(ranked[0], label="best")

    def baseline(tiers: tuple[int, ...], label: str) -> Plan:
        own = [p for p in ranked if tuple(s.tier for s in p.stages) == tiers]
        if not own:  # the edge-only class always exists; cloud-only is searched even when edges may not skip
            own = [p for active in sets for p in [_class_best(costs, tiers, active, objective)] if p is not None]
            own.sort(key=lambda p: _rank(p, objective))
        return replace(own[0], label=label)

    return PlanResult(objective=objective, best=best, candidates=(best, *ranked[1:max(1, top)]),
                      edge_only=baseline((0,), "edge-only"), cloud_only=baseline((count - 1,), "cloud-only"))


def _class_best(costs: CostTables, tiers: Sequence[int], active: Sequence[int], objective: Objective) -> Plan | None:
    """The best plan of one class. The DP is exact for given idle factors; the factors depend on the latency
    of the plan chosen, so the DP runs again with the factors of its last choice until they settle."""

    def step(factors: Factors) -> tuple[Plan, Gaps] | None:
        choice = _best_choice(costs, tiers, active, objective.kind, factors)
        if choice is None:
            return None
        candidate = Candidate.of(costs.profile, costs.topology, _stages_of(costs.profile, choice), active,
                                 choice.codecs)
        return evaluate(costs, candidate, factors, objective, "")

    return settle_idle_factors(costs, tiers, step)


def _best_choice(costs: CostTables, tiers: Sequence[int], active: Sequence[int], kind: str,
                 factors: Factors) -> _Choice | None:
    if kind == "throughput":
        bottleneck = _solve(costs, tiers, active, kind="load")
        if bottleneck is None:
            return None
        return _solve(costs, tiers, active, kind="latency", factors=factors, cap=bottleneck.value) or bottleneck
    return _solve(costs, tiers, active, kind="latency", factors=factors)


def _rank(p: Plan, objective: Objective) -> tuple[float, ...]:
    if objective.kind == "throughput":
        return (-p.throughput_per_s, p.latency_ms, -p.accuracy)
    if objective.kind == "deadline":
        return (0.0, -p.accuracy, p.latency_ms) if p.meets_deadline else (1.0, p.latency_ms, -p.accuracy)
    return (p.latency_ms, -p.accuracy, -p.throughput_per_s)



@dataclass(frozen=True)
class _Choice:
    """The DP's answer for one class: its tiers, their end positions, the codecs and the optimised value."""

    tiers: tuple[int, ...]
    bounds: tuple[int, ...]  # positions: 0, end of each computing tier (the last is K + 1)
    codecs: tuple[str, ...]
    value: float


def _solve(costs: CostTables, tiers: Sequence[int], active: Sequence[int], *, kind: Literal["latency", "load"],
           factors: Factors | None = None, cap: float | None = None) -> _Choice | None:
    """Best bounds and codecs for one class. ``kind``: "latency" (sum) or "load" (max); ``factors``: each
    tier's idle factor (latency only; default 1); ``cap`` bounds every load (the throughput tie-break: least
    latency among candidates whose bottleneck is at most ``cap``)."""
    q = costs.reach(active)
    N, K = costs.N, costs.K
    visited = visited_tiers(tiers)
    limit = np.inf if cap is None else cap * (1 + RELATIVE_TOLERANCE) + _LOAD_FLOOR
    loads = {t: costs.stage_load(t, active, q) for t in tiers} if kind == "load" or cap is not None else {}
    stages = {t: costs.stage_latency(t, active, q, (factors or {}).get(t, 1.0)) for t in tiers} \
        if kind == "latency" else {}
    combine = np.add if kind == "latency" else np.maximum
    value = np.full(N, np.inf)
    trace: list[tuple[np.ndarray, np.ndarray]] = []
    first_codec: str | None = None
    if tiers[0] == 0:
        value[INPUT_POSITION] = 0.0
    else:
        terms = costs.link_terms(0, tiers[0], 0, active)
        sending = np.maximum(terms.encode[INPUT_POSITION], terms.loads[INPUT_POSITION])
        ok = sending <= limit
        score = terms.latency[INPUT_POSITION] if kind == "latency" else sending
        score = np.where(ok, score, np.inf)
        if not np.isfinite(score).any():
            return None
        best = int(np.argmin(score))
        value[INPUT_POSITION], first_codec = float(score[best]), costs.codecs[best]
    for i in range(len(tiers) - 1):
        u, v = tiers[i], tiers[i + 1]
        hop = visited.index(u)
        terms = costs.link_terms(u, v, hop, active)
        if kind == "latency":
            total = value[:, None, None] + stages[u][:, :, None] + terms.latency[None, :, :]
        else:
            total = np.maximum(value[:, None, None],
                               np.maximum(loads[u][:, :, None] + terms.encode[None, :, :], terms.loads[None, :, :]))
        if cap is not None:
            feasible = np.maximum(loads[u][:, :, None] + terms.encode[None, :, :], terms.loads[None, :, :]) <= limit
            total = np.where(feasible, total, np.inf)
        flat = total.transpose(1, 0, 2).reshape(N, -1)  # row b: every (start a, codec) pair, a-major
        pick = np.argmin(flat, axis=1)
        value = flat[np.arange(N), pick]
        trace.append((pick // len(costs.codecs), pick % len(costs.codecs)))
    last = tiers[-1]
    end = stages[last][:, K + 1] if kind == "latency" else loads[last][:, K + 1]
    total = combine(value, end)
    if cap is not None:
        total = np.where(loads[last][:, K + 1] <= limit, total, np.inf)
    a = int(np.argmin(total))
    if not np.isfinite(total[a]):
        return None
    bounds = [K + 1, a]
    chosen: list[str] = []
    for starts, codec_index in reversed(trace):
        b = bounds[-1]
        chosen.append(costs.codecs[int(codec_index[b])])
        bounds.append(int(starts[b]))
    bounds.reverse()
    chosen.reverse()
    if first_codec is not None:
        chosen.insert(0, first_codec)
    return _Choice(tuple(tiers), tuple(bounds), tuple(chosen), float(total[a]))


def _stages_of(profile: Profile, choice: _Choice) -> list[StageCuts]:
    """The choice's stages in cut ids, as :func:`~splitexit.plan.prediction.predict` takes them."""
    cuts = profile.cuts
    return [(t, cut_at(cuts, a), cut_at(cuts, b)) for t, a, b in zip(choice.tiers, choice.bounds, choice.bounds[1:])]

