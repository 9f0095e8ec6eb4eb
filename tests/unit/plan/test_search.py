"""The search against brute force on hand-built profiles: every objective, every class, the baselines."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.plan.costs import CostTables
from splitexit.plan.objective import Objective
from splitexit.plan.prediction import predict
from splitexit.plan.profile import Profile
from splitexit.plan.result import Plan
from splitexit.plan.search import _solve, _stages_of, plan
from splitexit.plan.topology import LinkEstimate, Topology
from synthetic import chain, synthetic_profile


def every_candidate(profile: Profile, topology: Topology, *, edge_may_skip: bool = True) -> list[Plan]:
    """Every assignment of the candidate cuts to the tiers (skips included), every codec per link, every exit set."""
    cuts = list(profile.cuts)
    tiers = range(len(topology.tiers))
    codecs = list(profile.timing.transfers[0].codecs)
    usable = profile.exits.usable()
    exit_sets = [s for r in range(len(usable) + 1) for s in itertools.combinations(usable, r)]
    plans = []
    for count in range(1, len(topology.tiers) + 1):
        for used in itertools.combinations(tiers, count):
            if not edge_may_skip and used[0] != 0:
                continue
            links = count - 1 + (used[0] != 0)
            for inner in itertools.combinations(cuts, count - 1):
                bounds = [MODEL_INPUT, *inner, MODEL_OUTPUT]
                stages = list(zip(used, bounds[:-1], bounds[1:]))
                for chosen in itertools.product(codecs, repeat=links):
                    for active in exit_sets:
                        plans.append(predict(profile, topology, stages, active, chosen))
    return plans


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_finds_the_brute_force_optimum_for_every_objective(seed: int) -> None:
    profile = synthetic_profile(seed)
    topology = chain((float(2 + 4 * seed), 1.5, 1.0), (LinkEstimate(5e6 * (seed + 1), 0.004), LinkEstimate(2e8, 0.001)))
    brute = every_candidate(profile, topology)
    assert len(brute) > 200

    latency = plan(profile, topology, Objective("latency"))
    assert close(latency.best.latency_ms, min(p.latency_ms for p in brute))

    throughput = plan(profile, topology, Objective("throughput"))
    top = max(p.throughput_per_s for p in brute)
    assert close(throughput.best.throughput_per_s, top)
    tied = [p.latency_ms for p in brute if close(p.throughput_per_s, top)]
    assert close(throughput.best.latency_ms, min(tied)), "among equal throughputs the lowest latency wins"

    budget = sorted(p.latency_ms for p in brute)[len(brute) // 3] / 1e3
    deadline = plan(profile, topology, Objective("deadline", budget))
    feasible = [p for p in brute if p.latency_ms <= budget * 1e3]
    best_accuracy = max(p.accuracy for p in feasible)
    assert close(deadline.best.accuracy, best_accuracy)
    assert close(deadline.best.latency_ms, min(p.latency_ms for p in feasible if close(p.accuracy, best_accuracy)))
    assert deadline.best.meets_deadline


def test_every_class_gets_its_own_optimum_and_the_dp_values_agree_with_predict() -> None:
    """Per class (computing tiers x active exits) the DP's best equals brute force, and the value the DP
    optimised is exactly what the request-by-request prediction says (so its cost arrays add up right)."""
    profile = synthetic_profile(11, cuts=5, exits=(0, 2, 4))
    topology = chain((5.0, 2.0, 1.0), (LinkEstimate(3e6, 0.006, jitter=0.002), LinkEstimate(5e7, 0.002, loss=0.01)))
    brute = every_candidate(profile, topology)

    def key(p: Plan) -> tuple:
        return tuple(s.tier for s in p.stages), p.active_exits

    for kind in ("latency", "throughput"):
        result = plan(profile, topology, Objective(kind), top=10_000)  # type: ignore[arg-type]
        classes = {key(p) for p in brute}
        assert {key(p) for p in result.candidates} == classes
        for candidate in result.candidates:
            own = [p for p in brute if key(p) == key(candidate)]
            if kind == "latency":
                assert close(candidate.latency_ms, min(p.latency_ms for p in own))
            else:
                assert close(candidate.throughput_per_s, max(p.throughput_per_s for p in own))
    costs = CostTables(profile, topology, None)
    for tiers, active in {key(p) for p in brute}:
        for kind in ("latency", "load"):
            choice = _solve(costs, tiers, active, kind=kind)
            assert choice is not None
            predicted = predict(profile, topology, _stages_of(profile, choice), active, choice.codecs)
            expected = predicted.latency_ms / 1e3 if kind == "latency" else 1 / predicted.throughput_per_s
            assert close(choice.value, expected), (tiers, active, kind)


def test_dp_optimum_holds_with_replicas_and_without_edge_skipping() -> None:
    profile = synthetic_profile(7)
    topology = chain((3.0, 2.0, 1.0), replicas=(1, 3, 1))
    brute = every_candidate(profile, topology, edge_may_skip=False)
    for kind in ("latency", "throughput"):
        result = plan(profile, topology, Objective(kind), edge_may_skip=False)  # type: ignore[arg-type]
        assert result.best.edge_computes
        if kind == "latency":
            assert close(result.best.latency_ms, min(p.latency_ms for p in brute))
        else:
            assert close(result.best.throughput_per_s, max(p.throughput_per_s for p in brute))


def test_baselines_and_candidates_are_what_they_claim() -> None:
    profile = synthetic_profile(3)
    topology = chain()
    result = plan(profile, topology, Objective("latency"), top=4)
    assert [s.tier for s in result.edge_only.stages] == [0] and result.edge_only.links == ()
    assert [s.tier for s in result.cloud_only.stages] == [2]
    (link,) = result.cloud_only.links
    assert link.cut is MODEL_INPUT and link.source == "edge" and link.target == "cloud2" and link.via == ("cloud1",)
    assert result.cloud_only.skipped == ("edge", "cloud1")
    assert result.candidates[0] == result.best and len(result.candidates) == 4
    latencies = [p.latency_ms for p in result.candidates]
    assert latencies == sorted(latencies)
    assert result.best.latency_ms <= min(result.edge_only.latency_ms, result.cloud_only.latency_ms)
    assert result.speedup(result.edge_only) >= 1.0
    json.dumps(result.best.to_dict())  # plain data all the way down


def test_the_choice_follows_the_network() -> None:
    profile = synthetic_profile(4)
    slow = chain((8.0, 1.0, 1.0), (LinkEstimate(1e5, 0.05), LinkEstimate(1e9, 0.001)))
    assert plan(profile, slow).best.stages[-1].tier == 0, "a 100 kbit/s, 50 ms uplink: keep everything on the edge"
    fast = chain((50.0, 1.0, 1.0), (LinkEstimate(1e10, 0.0), LinkEstimate(1e10, 0.0)))
    best = plan(profile, fast).best
    assert not best.edge_computes, "a 50x slower edge next to a free link: send the input"
    assert best.links[0].cut is MODEL_INPUT
    kept = plan(profile, fast, edge_may_skip=False).best
    assert kept.edge_computes

