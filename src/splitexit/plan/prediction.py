"""The predictions for one candidate plan, computed request by request from the cost tables.

This walks each calibration sample's path (independently of the search's dynamic programme, which the
unit tests check against it): every stage it visits, every link it crosses down and back up, until the
exit that answers it. A worker that idles between requests computes slower
(:attr:`~splitexit.plan.profile.MachineProfile.idle_factors`), and how long it idles depends on the latency
being predicted: :func:`settle_idle_factors` finds the factors by fixed-point iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from splitexit.cuts import Cut, cut_label
from splitexit.errors import ConfigError
from splitexit.plan.costs import CostTables, cut_at, position_of
from splitexit.plan.objective import Objective
from splitexit.plan.profile import Profile
from splitexit.plan.result import Plan, PlannedLink, PlannedStage
from splitexit.plan.topology import Topology, visited_tiers

__all__ = [
    "MAX_FIXED_POINT",
    "Candidate",
    "Factors",
    "Gaps",
    "StageCuts",
    "evaluate",
    "predict",
    "settle_idle_factors",
]

#: Rounds of the idle-factor fixed point (factors settle in two or three: they saturate after ~10 ms idle).
MAX_FIXED_POINT = 8
#: Idle factors this close (relative, absolute) to the round before have settled.
SETTLED = (1e-9, 1e-12)

Factors = Mapping[int, float]  # tier -> how much slower its batch-1 compute runs after idling (>= 1)
StageCuts = tuple[int, Cut, Cut]  # (tier, start cut, end cut)
Gaps = dict[int, float]  # computing tier -> seconds its worker idles between requests


def predict(profile: Profile, topology: Topology, stages: Sequence[StageCuts], active_exits: Iterable[int],
            codecs: Sequence[str], *, objective: Objective = Objective(), label: str = "") -> Plan:
    """The predictions for one candidate (see the module docstring).

    ``stages`` are ``(tier, start, end)`` for the tiers that compute, in chain order, covering the model
    from input to output without gaps. ``codecs`` has one entry per used link: the input
    link first when tier 0 is not among the stages, then one between consecutive stages.
    """
    candidate = Candidate.of(profile, topology, stages, active_exits, codecs)
    costs = CostTables(profile, topology, list(dict.fromkeys(codecs)) or None)
    plan = settle_idle_factors(costs, candidate.tiers,
                               lambda factors: evaluate(costs, candidate, factors, objective, label))
    assert plan is not None  # evaluate always answers
    return plan


def settle_idle_factors(costs: CostTables, tiers: Iterable[int],
                        step: Callable[[Factors], tuple[Plan, Gaps] | None]) -> Plan | None:
    """Run ``step`` (a plan, and how long each tier idles under it, for given idle factors) from the coldest
    factors, with the factors its last plan implies, until they settle; None as soon as ``step`` finds none."""
    factors: Factors = {t: costs.machines[t].idle_factor(math.inf) for t in tiers}
    plan = None
    for _ in range(MAX_FIXED_POINT):
        found = step(factors)
        if found is None:
            return None
        plan, gaps = found
        updated = {t: costs.machines[t].idle_factor(gap) for t, gap in gaps.items()}
        if all(math.isclose(updated[t], factors[t], rel_tol=SETTLED[0], abs_tol=SETTLED[1]) for t in updated):
            break
        factors = updated
    return plan


@dataclass(frozen=True)
class Candidate:
    """A plan to predict, as positions: each computing tier's span, the active exits, a codec per used link."""

    spans: tuple[tuple[int, int, int], ...]  # (tier, start position, end position) of the computing tiers
    active: tuple[int, ...]
    codecs: tuple[str, ...]

    @property
    def tiers(self) -> list[int]:
        return [t for t, _, _ in self.spans]

    @classmethod
    def of(cls, profile: Profile, topology: Topology, stages: Sequence[StageCuts], active_exits: Iterable[int],
           codecs: Sequence[str]) -> Candidate:
        """The candidate of ``stages`` in cut ids; a :class:`ConfigError` unless they chain input to output."""
        K = len(profile.cuts)
        spans = []
        for tier, start, end in stages:
            a, b = position_of(profile.cuts, start), position_of(profile.cuts, end)
            if a is None or b is None:
                raise ConfigError(f"stage {cut_label(start)}..{cut_label(end)} uses a cut that is not a candidate: "
                                  f"{list(profile.cuts)}")
            spans.append((tier, a, b))
        tiers = [t for t, _, _ in spans]
        if (not spans or spans[0][1] != 0 or spans[-1][2] != K + 1
                or any(x[2] != y[1] for x, y in zip(spans, spans[1:])) or any(a >= b for _, a, b in spans)
                or tiers != sorted(set(tiers)) or not 0 <= tiers[0] or tiers[-1] >= len(topology.tiers)):
            raise ConfigError(f"stages {list(stages)} must cover input to output in forward order on distinct tiers")
        links = len(visited_tiers(tiers)) - 1
        if len(codecs) != links:
            raise ConfigError(f"{links} links need {links} codecs, got {list(codecs)}")
        active = tuple(sorted(set(active_exits)))
        early = profile.exits.early_exits
        if any(not 0 <= j < early for j in active):
            raise ConfigError(f"active exits {list(active)} must be early exits 0..{early - 1}")
        return cls(tuple(spans), active, tuple(codecs))


def evaluate(costs: CostTables, candidate: Candidate, factors: Factors, objective: Objective,
             label: str) -> tuple[Plan, Gaps]:
    """The plan's predictions for given idle factors, and each computing tier's idle time between requests."""
    profile, topology = costs.profile, costs.topology
    spans, active, codecs = candidate.spans, candidate.active, candidate.codecs
    tiers = candidate.tiers
    visited = visited_tiers(tiers)
    rt = topology.costs
    table = profile.exits
    leave = table.route(active)
    exit_pos = costs.exit_position
    q = costs.reach(active)
    # Latency, one sample at a time: walk its path, pay what it meets, stop where it is answered.
    hops = list(zip(visited, visited[1:]))
    latencies = np.zeros(table.samples)
    busy = dict.fromkeys(tiers, 0.0)  # expected seconds each tier's worker really computes per input
    slowed = dict.fromkeys(tiers, 0.0)  # the same with its slowdown: what the trace shows, per input
    for j in range(table.early_exits + 1):
        answer = exit_pos[j]
        share = float(np.mean(leave == j))
        total, up = 0.0, 0.0
        if tiers[0] != 0:  # the edge sends the input as it is
            total += _down(costs, 0, tiers[0], 0, 0, codecs[0])
            up += _up(costs, 0, tiers[0], 0)
        for index, (tier, a, b) in enumerate(spans):
            compute = (_stage_path(costs, tier, a, b, answer, active) * factors[tier]
                       + rt.compute_overhead * topology.tiers[tier].compute_scale)
            # the emulation sleeps away the slowdown: the worker idles through it too
            busy[tier] += share * compute / topology.tiers[tier].compute_scale
            slowed[tier] += share * compute
            total += compute + rt.stage_overhead
            if answer <= b:
                break
            hop = visited.index(tier)
            nxt = spans[index + 1][0]
            total += _down(costs, tier, nxt, b, hop, codecs[hop])
            up += _up(costs, tier, nxt, hop)
        latencies[leave == j] = total + up
    latency = float(latencies.mean())
    # One request at a time, a tier reached by a fraction q of requests is called every latency / q seconds.
    gaps = {t: max(0.0, latency / q[a] - busy[t] / q[a]) if q[a] > 0 else math.inf for t, a, _ in spans}
    # Throughput: every resource's busy time per input.
    loads: dict[str, float] = {}
    batch = rt.max_batch
    for tier, a, b in spans:
        loads[f"compute on {topology.tiers[tier].name}"] = float(costs.stage_load(tier, active, q)[a, b])
    if tiers[0] != 0:
        loads[f"compute on {topology.tiers[0].name}"] = 0.0
    links = []
    for hop, (u, v) in enumerate(hops):
        p = 0 if hop == 0 and tiers[0] != 0 else spans[tiers.index(u)][2]
        codec = codecs[hop]
        link = topology.link(u, v)
        send, receive = topology.tiers[u], topology.tiers[v]
        transfer = costs.transfer[u][codec][p]
        decode = costs.transfer[v][codec][p].decode_s * receive.codec_scale
        loads[f"compute on {send.name}"] += q[p] * transfer.encode_s * send.codec_scale / len(send.nodes)
        replicas = len(receive.nodes)
        batched = transfer.bytes + rt.down_bytes(hop) / batch
        loads[f"link {send.nodes[0]}→{receive.nodes[0]}"] = q[p] * link.serialisation(batched) / replicas
        loads[f"link {receive.nodes[0]}→{send.nodes[0]} (results)"] = \
            q[p] * link.serialisation(rt.up_bytes(hop, profile.num_classes)) / replicas
        loads[f"decode on {receive.name}"] = q[p] * decode / replicas
        via = tuple(n for t in topology.tiers[u + 1:v] for n in t.nodes)
        links.append(PlannedLink(u, v, send.nodes[0], receive.nodes[0], cut_at(profile.cuts, p), codec,
                                 float(q[p] * (transfer.bytes + rt.down_bytes(hop))), via))
    bottleneck = max(loads, key=lambda k: loads[k])
    throughput = 1.0 / loads[bottleneck] if loads[bottleneck] > 0 else math.inf
    planned = tuple(PlannedStage(t, topology.tiers[t].nodes, cut_at(profile.cuts, a), cut_at(profile.cuts, b),
                                 compute_ms=slowed[t] / q[a] * 1e3 if q[a] > 0 else 0.0)
                    for t, a, b in spans)
    used = set(tiers)
    skipped = tuple(n for t in topology.tiers if t.index not in used for n in t.nodes)
    plan = Plan(objective=objective.kind, stages=planned, links=tuple(links), skipped=skipped, active_exits=active,
                  latency_ms=latency * 1e3, throughput_per_s=throughput, accuracy=table.accuracy(active),
                  exit_rates=table.exit_rates(active), bottleneck=bottleneck,
                  deadline_ms=objective.deadline * 1e3 if objective.deadline is not None else None, label=label)
    return plan, gaps


def _stage_path(costs: CostTables, tier: int, a: int, b: int, answer: int, active: Sequence[int]) -> float:
    """Warm compute seconds (slowdown included) a sample answered at position ``answer`` spends in stage (a, b]."""
    m = costs.machines[tier]
    c0 = m.call_overhead.median
    stop = min(b, answer)
    seconds = sum(max(m.segments[s].at(1) - c0, 0.0) for s in range(a, stop))
    parts = 1 + sum(1 for e in costs.exit_at if a < e < stop)
    seconds += c0 * parts + m.stage_call_at(1)
    seconds += sum(m.heads[j].at(1) for j in active if a < costs.exit_position[j] <= stop)
    if stop == costs.K + 1:
        seconds += m.heads[-1].at(1)
    return seconds * costs.topology.tiers[tier].compute_scale


def _down(costs: CostTables, u: int, v: int, p: int, hop: int, codec: str) -> float:
    rt = costs.topology.costs
    link = costs.topology.link(u, v)
    out = costs.transfer[u][codec][p]
    into = costs.transfer[v][codec][p]
    return (out.encode_s * costs.topology.tiers[u].codec_scale + into.decode_s * costs.topology.tiers[v].codec_scale
            + link.serialisation(out.bytes + rt.down_bytes(hop)) + link.delay() + rt.per_message(link))


def _up(costs: CostTables, u: int, v: int, hop: int) -> float:
    rt = costs.topology.costs
    link = costs.topology.link(u, v)
    return link.serialisation(rt.up_bytes(hop, costs.profile.num_classes)) + link.delay() + rt.per_message(link)

