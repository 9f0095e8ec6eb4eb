"""Predictions for one candidate: worked out by hand, over composed links, with idle workers, and refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import ConfigError
from splitexit.plan.objective import Objective
from splitexit.plan.prediction import predict
from splitexit.plan.search import plan
from splitexit.plan.topology import LinkEstimate
from synthetic import chain, synthetic_profile


def test_a_skipped_tier_costs_the_composed_link() -> None:
    profile = synthetic_profile(5)
    first, second = LinkEstimate(8e6, 0.004, jitter=0.002, loss=0.01), LinkEstimate(2e7, 0.003, loss=0.02)
    three = chain((4.0, 1.0, 1.0), (first, second))
    composed = LinkEstimate.compose([first, second])
    assert composed.bandwidth == 8e6 and math.isclose(composed.latency, 0.007) and math.isclose(composed.jitter, 0.002)
    assert math.isclose(composed.loss, 1 - 0.99 * 0.98)
    two = chain((4.0, 1.0), (composed,))
    stages = [(0, MODEL_INPUT, profile.cuts[1]), (2, profile.cuts[1], MODEL_OUTPUT)]
    via = predict(profile, three, stages, (0,), ["int8+zstd"])
    direct = predict(profile, two, [(0, MODEL_INPUT, profile.cuts[1]), (1, profile.cuts[1], MODEL_OUTPUT)], (0,),
                     ["int8+zstd"])
    assert via.skipped == ("cloud1",) and via.links[0].via == ("cloud1",)
    assert math.isclose(via.latency_ms, direct.latency_ms)
    assert math.isclose(via.throughput_per_s, direct.throughput_per_s)


def test_latency_adds_up_by_hand_for_a_two_tier_split() -> None:
    """One candidate worked out from the documented model, term by term."""
    profile = synthetic_profile(6, exits=(1,))
    m, costs = profile.timing, chain().costs
    topology = chain((4.0, 1.0), (LinkEstimate(1e7, 0.01),))
    cut = profile.cuts[2]
    result = predict(profile, topology, [(0, MODEL_INPUT, cut), (1, cut, MODEL_OUTPUT)], (0,), ["raw"])
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
    stage = costs.stage_overhead
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
        predict(profile, topology, [(0, MODEL_INPUT, a), (1, b, MODEL_OUTPUT)], (), ["raw"])
    with pytest.raises(ConfigError, match="codecs"):
        predict(profile, topology, [(0, MODEL_INPUT, a), (1, a, MODEL_OUTPUT)], (), [])
    with pytest.raises(ConfigError, match="not a candidate"):
        predict(profile, topology, [(0, MODEL_INPUT, 12345), (1, 12345, MODEL_OUTPUT)], (), ["raw"])
    with pytest.raises(ConfigError, match="deadline"):
        Objective("deadline")
    with pytest.raises(ConfigError, match="not profiled"):
        plan(profile, topology, codecs=["fp16"])



def test_idle_workers_compute_slower_and_the_factor_follows_the_predicted_latency() -> None:
    flat = synthetic_profile(8)
    cold = replace(flat, timing=replace(flat.timing, idle_factors={0.0001: 1.2, 0.01: 2.0}))
    m = cold.timing
    assert m.idle_factor(0.00001) == 1.2 and m.idle_factor(1.0) == 2.0
    assert math.isclose(m.idle_factor(0.001), 1.6), "linear in log(idle time)"

    # Edge only, no waiting: the worker idles ~1 ms between requests, so it is only a little cold.
    near = chain((4.0, 1.0, 1.0), (LinkEstimate(1e9, 0.0002), LinkEstimate(1e9, 0.0001)))
    edge_only = [(0, MODEL_INPUT, MODEL_OUTPUT)]
    quick, base = predict(cold, near, edge_only, (), []), predict(flat, near, edge_only, (), [])
    assert 1.2 < (quick.latency_ms - base.latency_ms) / (base.latency_ms - 0.9) + 1 < 2.0

    # Behind a 50 ms link every worker idles for 100 ms or more: fully cold, compute costs twice its warm time.
    far = chain((4.0, 1.0, 1.0), (LinkEstimate(1e9, 0.05), LinkEstimate(1e9, 0.001)))
    far = replace(far, costs=replace(far.costs, compute_overhead=0.0))  # the runtime's share is not slowed by idling
    no_compute = replace(far, tiers=tuple(replace(t, compute_scale=1e-12) for t in far.tiers))
    split = [(0, MODEL_INPUT, cold.cuts[0]), (1, cold.cuts[0], MODEL_OUTPUT)]
    slow, warm = predict(cold, far, split, (), ["raw"]), predict(flat, far, split, (), ["raw"])
    transport = predict(flat, no_compute, split, (), ["raw"])
    assert math.isclose(slow.latency_ms - warm.latency_ms, warm.latency_ms - transport.latency_ms, rel_tol=1e-6)

    for topology in (near, far):  # the planner's fixed point lands where predict's does
        result = plan(cold, topology, top=100)
        for candidate in result.candidates:
            stages = [(s.tier, s.start, s.end) for s in candidate.stages]
            again = predict(cold, topology, stages, candidate.active_exits, [link.codec for link in candidate.links])
            assert math.isclose(again.latency_ms, candidate.latency_ms, rel_tol=1e-6), candidate.describe()
