"""The planner against brute force on hand-built profiles, and apply_plan on cluster files."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import yaml
from synthetic import chain, synthetic_profile

from splitexit.config import ClusterSpec
from splitexit.errors import ConfigError
from splitexit.plan.planner import (
    LinkEstimate,
    Objective,
    Plan,
    Topology,
    _Costs,
    _solve,
    _stages_of,
    apply_plan,
    plan,
    predict,
    topology_from_cluster,
)
from splitexit.plan.profile import Profile


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
                bounds = [None, *inner, None]
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
    costs = _Costs(profile, topology, None)
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
    assert link.cut is None and link.source == "edge" and link.target == "cloud2" and link.via == ("cloud1",)
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
    assert best.links[0].cut is None
    kept = plan(profile, fast, edge_may_skip=False).best
    assert kept.edge_computes


def test_a_skipped_tier_costs_the_composed_link() -> None:
    profile = synthetic_profile(5)
    first, second = LinkEstimate(8e6, 0.004, jitter=0.002, loss=0.01), LinkEstimate(2e7, 0.003, loss=0.02)
    three = chain((4.0, 1.0, 1.0), (first, second))
    composed = LinkEstimate.compose([first, second])
    assert composed.bandwidth == 8e6 and math.isclose(composed.latency, 0.007) and math.isclose(composed.jitter, 0.002)
    assert math.isclose(composed.loss, 1 - 0.99 * 0.98)
    two = chain((4.0, 1.0), (composed,))
    stages = [(0, None, profile.cuts[1]), (2, profile.cuts[1], None)]
    via = predict(profile, three, stages, (0,), ["int8+zstd"])
    direct = predict(profile, two, [(0, None, profile.cuts[1]), (1, profile.cuts[1], None)], (0,), ["int8+zstd"])
    assert via.skipped == ("cloud1",) and via.links[0].via == ("cloud1",)
    assert math.isclose(via.latency_ms, direct.latency_ms)
    assert math.isclose(via.throughput_per_s, direct.throughput_per_s)


def test_latency_adds_up_by_hand_for_a_two_tier_split() -> None:
    """One candidate worked out from the documented model, term by term."""
    profile = synthetic_profile(6, exits=(1,))
    m, costs = profile.timing, chain().costs
    topology = chain((4.0, 1.0), (LinkEstimate(1e7, 0.01),))
    cut = profile.cuts[2]
    result = predict(profile, topology, [(0, None, cut), (1, cut, None)], (0,), ["raw"])
    early = float(profile.exits.confident[0].mean())
    c0 = m.call_overhead.median
    fixed = m.stage_call_at(1) + c0

    def segs(a: int, b: int) -> float:
        return sum(max(m.segments[s].at(1) - c0, 0.0) for s in range(a, b))

    edge_early = 4.0 * (segs(0, 2) + fixed + m.heads[0].at(1))
    edge_late = 4.0 * (segs(0, 3) + fixed + c0 + m.heads[0].at(1))
    transfer = m.transfers[3].codecs["raw"]
    down = transfer.encode_s + transfer.decode_s + (transfer.bytes + costs.down_bytes(0)) * 8 / 1e7 + 0.01
    up = costs.up_bytes(0, 10) * 8 / 1e7 + 0.01
    cloud = segs(3, 5) + fixed + m.heads[-1].at(1)
    stage = costs.max_wait + costs.stage_overhead
    edge_stage, cloud_stage = stage + 4.0 * costs.compute_overhead, stage + costs.compute_overhead
    expected = early * (edge_early + edge_stage) + (1 - early) * (
        edge_late + edge_stage + down + up + 2 * costs.message_overhead + cloud + cloud_stage)
    assert math.isclose(result.latency_ms, expected * 1e3, rel_tol=1e-9)
    assert math.isclose(result.exit_rates[0], early)
    assert math.isclose(result.bytes_per_input[0], (1 - early) * (transfer.bytes + costs.down_bytes(0)))


def test_predict_refuses_candidates_that_are_not_chains() -> None:
    profile = synthetic_profile(0)
    topology = chain()
    a, b = profile.cuts[0], profile.cuts[2]
    with pytest.raises(ConfigError, match="cover input to output"):
        predict(profile, topology, [(0, None, a), (1, b, None)], (), ["raw"])
    with pytest.raises(ConfigError, match="codecs"):
        predict(profile, topology, [(0, None, a), (1, a, None)], (), [])
    with pytest.raises(ConfigError, match="not a candidate"):
        predict(profile, topology, [(0, None, 12345), (1, 12345, None)], (), ["raw"])
    with pytest.raises(ConfigError, match="deadline"):
        Objective("deadline")
    with pytest.raises(ConfigError, match="not profiled"):
        plan(profile, topology, codecs=["fp16"])


CLUSTER = """
nodes:
  - {name: edge, role: edge, slowdown: 8}
  - {name: cloud1, address: 127.0.0.1:50061}
  - {name: cloud2, address: 127.0.0.1:50062}
links:
  - {from: edge, to: cloud1, bandwidth: 20Mbit, latency: 10ms, jitter: 1ms, codec: int8+zstd}
  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms, loss: 0.01}
batching: {max_batch: 4, max_wait: 3ms}
"""


def test_topology_comes_from_the_cluster_file_and_measured_links_plug_in() -> None:
    cluster = ClusterSpec.model_validate(yaml.safe_load(CLUSTER))
    topology = topology_from_cluster(cluster)
    assert [t.nodes for t in topology.tiers] == [("edge",), ("cloud1",), ("cloud2",)]
    assert [t.compute_scale for t in topology.tiers] == [8.0, 1.0, 1.0]
    assert topology.links[0].bandwidth == 20e6 and topology.links[0].latency == 0.01
    assert topology.links[0].emulated and topology.link(0, 2).emulated, "emulated links pay for late-waking sleeps"
    costs = topology.costs
    assert costs.per_message(topology.links[0]) == costs.message_overhead + costs.emulation_overhead
    assert costs.per_message(LinkEstimate(1e9, 0.001)) == costs.message_overhead
    assert topology.costs.max_batch == 4 and topology.costs.max_wait == 0.003
    measured = LinkEstimate(5e6, 0.03, origin="measured")
    plugged = topology_from_cluster(cluster, measured_links={("edge", "cloud1"): measured})
    assert plugged.links[0] == measured and plugged.links[1] == topology.links[1]


def test_a_declared_or_measured_link_past_a_skipped_tier_is_used_as_the_runtime_uses_it() -> None:
    spec = yaml.safe_load(CLUSTER)
    spec["links"].append({"from": "edge", "to": "cloud2", "bandwidth": "100Mbit", "latency": "2ms"})
    cluster = ClusterSpec.model_validate(spec)
    topology = topology_from_cluster(cluster)
    direct = topology.link(0, 2)
    assert (direct.bandwidth, direct.latency) == (100e6, 0.002), "the file's direct link, not the hops composed"
    assert topology.link(0, 2) == LinkEstimate.from_spec(cluster.link("edge", "cloud2")), "as the runtime sends"
    assert [(a, b) for a, b, _ in topology.named_links()] == [("edge", "cloud1"), ("cloud1", "cloud2"),
                                                              ("edge", "cloud2")]
    profile = synthetic_profile(3)
    skip = [(0, None, profile.cuts[1]), (2, profile.cuts[1], None)]
    composed = predict(profile, topology_from_cluster(ClusterSpec.model_validate(yaml.safe_load(CLUSTER))), skip,
                       (0,), ["raw"])
    assert predict(profile, topology, skip, (0,), ["raw"]).latency_ms < composed.latency_ms

    dropped = LinkEstimate(1e5, 0.002, origin="measured")
    measured = topology_from_cluster(cluster, measured_links={("edge", "cloud2"): dropped})
    assert measured.link(0, 2) == dropped and measured.links[0] == topology.links[0]
    slow = predict(profile, measured, skip, (0,), ["raw"])
    assert slow.latency_ms > 2 * composed.latency_ms, "a measured drop on the direct link reaches the prediction"
    undeclared = topology_from_cluster(ClusterSpec.model_validate(yaml.safe_load(CLUSTER)),
                                       measured_links={("edge", "cloud2"): dropped})
    assert undeclared.link(0, 2) == dropped, "what the runtime measured over composed hops counts too"

    swept = topology.with_bandwidth(1e6)
    assert swept.links[0].bandwidth == 1e6 and swept.link(0, 2).bandwidth == 1e6, "every uplink of the edge"
    assert swept.links[1] == topology.links[1]
    with pytest.raises(ConfigError, match="skip a tier"):
        Topology(topology.tiers, topology.links, direct={(0, 1): direct})


def test_apply_plan_writes_ends_codecs_and_drops_skipped_workers() -> None:
    cluster = ClusterSpec.model_validate(yaml.safe_load(CLUSTER))
    profile = synthetic_profile(1)
    topology = topology_from_cluster(cluster)
    skip_middle = predict(profile, topology, [(0, None, profile.cuts[1]), (2, profile.cuts[1], None)], (0, 1),
                          ["int8+zstd"])
    served = apply_plan(cluster, skip_middle)
    assert [n.name for n in served.nodes] == ["edge", "cloud2"]
    assert served.node("edge").ends_at == profile.cuts[1] and served.node("cloud2").ends_at is None
    (link,) = served.links
    assert (link.source, link.target, link.codec) == ("edge", "cloud2", skip_middle.links[0].codec)
    assert link.bandwidth == 20e6 and math.isclose(link.latency, 0.011) and link.jitter == 0.001
    assert math.isclose(link.loss, 0.01)
    assert served.batching == cluster.batching

    everything = predict(profile, topology, [(0, None, profile.cuts[0]), (1, profile.cuts[0], profile.cuts[2]),
                                             (2, profile.cuts[2], None)], (), ["raw", "int8+zstd"])
    served = apply_plan(cluster, everything)
    assert [n.ends_at for n in served.nodes] == [profile.cuts[0], profile.cuts[2], None]
    assert [l.codec for l in served.links] == ["raw", "int8+zstd"]
    assert served.links[0].bandwidth == 20e6 and served.links[1].loss == 0.01

    cloud_only = predict(profile, topology, [(1, None, None)], (), ["raw"])
    served = apply_plan(cluster, cloud_only)
    assert [(n.name, n.ends_at) for n in served.nodes] == [("edge", "input"), ("cloud1", None)]

    edge_only = predict(profile, topology, [(0, None, None)], (), [])
    served = apply_plan(cluster, edge_only)
    assert [n.name for n in served.nodes] == ["edge"] and served.links == ()


def test_apply_plan_keeps_replicas_and_renumbers_tiers() -> None:
    cluster = ClusterSpec.model_validate(yaml.safe_load("""
nodes:
  - {name: edge, role: edge}
  - {name: a1, address: 127.0.0.1:50061, tier: 1}
  - {name: b1, address: 127.0.0.1:50062, tier: 2}
  - {name: b2, address: 127.0.0.1:50063, tier: 2}
links:
  - {from: edge, to: a1, bandwidth: 10Mbit, latency: 5ms}
  - {from: a1, to: b1, latency: 1ms}
  - {from: a1, to: b2, latency: 2ms}
"""))
    profile = synthetic_profile(2)
    topology = topology_from_cluster(cluster)
    assert topology.tiers[2].nodes == ("b1", "b2")
    chosen = predict(profile, topology, [(0, None, profile.cuts[1]), (2, profile.cuts[1], None)], (), ["raw"])
    served = apply_plan(cluster, chosen)
    assert [(n.name, n.tier) for n in served.nodes] == [("edge", None), ("b1", 1), ("b2", 1)]
    assert [(l.source, l.target) for l in served.links] == [("edge", "b1"), ("edge", "b2")]
    assert [round(l.latency, 6) for l in served.links] == [0.006, 0.007], "composed along each replica's own hop"
    assert all(l.bandwidth == 10e6 for l in served.links)
    with pytest.raises(ConfigError, match="tier"):
        apply_plan(ClusterSpec.model_validate(yaml.safe_load(CLUSTER)), chosen)


def test_idle_workers_compute_slower_and_the_factor_follows_the_predicted_latency() -> None:
    from dataclasses import replace

    flat = synthetic_profile(8)
    cold = replace(flat, timing=replace(flat.timing, idle_factors={0.0001: 1.2, 0.01: 2.0}))
    m = cold.timing
    assert m.idle_factor(0.00001) == 1.2 and m.idle_factor(1.0) == 2.0
    assert math.isclose(m.idle_factor(0.001), 1.6), "linear in log(idle time)"

    # Edge only, no waiting: the worker idles ~1 ms between requests, so it is only a little cold.
    near = chain((4.0, 1.0, 1.0), (LinkEstimate(1e9, 0.0002), LinkEstimate(1e9, 0.0001)))
    near = replace(near, costs=replace(near.costs, max_wait=0.0005))
    edge_only = [(0, None, None)]
    quick, base = predict(cold, near, edge_only, (), []), predict(flat, near, edge_only, (), [])
    assert 1.2 < (quick.latency_ms - base.latency_ms) / (base.latency_ms - 0.9) + 1 < 2.0

    # Behind a 50 ms link every worker idles for 100 ms or more: fully cold, compute costs twice its warm time.
    far = chain((4.0, 1.0, 1.0), (LinkEstimate(1e9, 0.05), LinkEstimate(1e9, 0.001)))
    far = replace(far, costs=replace(far.costs, compute_overhead=0.0))  # the runtime's share is not slowed by idling
    no_compute = replace(far, tiers=tuple(replace(t, compute_scale=1e-12) for t in far.tiers))
    split = [(0, None, cold.cuts[0]), (1, cold.cuts[0], None)]
    slow, warm = predict(cold, far, split, (), ["raw"]), predict(flat, far, split, (), ["raw"])
    transport = predict(flat, no_compute, split, (), ["raw"])
    assert math.isclose(slow.latency_ms - warm.latency_ms, warm.latency_ms - transport.latency_ms, rel_tol=1e-6)

    for topology in (near, far):  # the planner's fixed point lands where predict's does
        result = plan(cold, topology, top=100)
        for candidate in result.candidates:
            stages = [(s.tier, s.start, s.end) for s in candidate.stages]
            again = predict(cold, topology, stages, candidate.active_exits, [l.codec for l in candidate.links])
            assert math.isclose(again.latency_ms, candidate.latency_ms, rel_tol=1e-6), candidate.describe()
