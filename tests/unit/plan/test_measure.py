"""Measuring a profile: exit routing simulated exactly as Stage routes, every segment, head and codec timed,
idle factors from paired calls."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import torch

from splitexit import EarlyExitNet
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.plan.candidates import candidate_cuts
from splitexit.plan.measure import measure_exits, measure_idle_factors, measure_timing


def test_exit_table_routes_every_sample_like_the_stages_do(net: EarlyExitNet, calib) -> None:
    table = measure_exits(net, calib, key={})
    assert table.samples == len(calib) and table.early_exits == net.num_exits - 1
    x = torch.stack([calib[i][0] for i in range(len(calib))])
    labels = torch.tensor([int(calib[i][1]) for i in range(len(calib))])
    policy = net.policy
    exits = range(net.num_exits - 1)
    try:
        for active in itertools.chain.from_iterable(itertools.combinations(exits, r) for r in range(len(exits) + 1)):
            thresholds = tuple(t if i in active else math.inf for i, t in enumerate(policy.thresholds))
            net.set_policy(policy.model_copy(update={"thresholds": thresholds}))
            served = net.infer(x)
            simulated = table.route(active)
            assert simulated.tolist() == served.exit.tolist(), f"active exits {active}"
            assert len(set(simulated.tolist())) == len(active) + 1, "every active exit should answer someone"
            accuracy = float((served.prediction == labels).double().mean())
            assert math.isclose(table.accuracy(active), accuracy)
            # and across a split, as a chain of stages runs it
            cut = net.exit_cuts[0].id
            with torch.inference_mode():
                first = net.stage(MODEL_INPUT, cut).run((x,))
                second = net.stage(cut, MODEL_OUTPUT).run(first.forward)
            exit_of = torch.empty(len(x), dtype=torch.int64)
            exit_of[first.rows] = first.exit
            exit_of[first.forward_rows[second.rows]] = second.exit
            assert exit_of.tolist() == simulated.tolist()
    finally:
        net.set_policy(policy)



def test_timing_covers_every_segment_head_and_codec(net: EarlyExitNet, calib, fast: dict[str, Any]) -> None:
    cuts = candidate_cuts(net, limit=6)
    x = torch.stack([calib[i][0] for i in range(16)])
    timing = measure_timing(net, x, cuts, **fast)
    assert [(s.start, s.end) for s in timing.segments] == list(zip([MODEL_INPUT, *cuts], [*cuts, MODEL_OUTPUT]))
    assert sum(s.flops for s in timing.segments) == net.graph.total_flops
    assert len(timing.heads) == net.num_exits and timing.heads[-1].cut is MODEL_OUTPUT
    assert [t.cut for t in timing.transfers] == [MODEL_INPUT, *cuts]
    for segment in timing.segments:
        assert set(segment.seconds) == {1, 2} and all(t.median > 0 and t.q1 <= t.median <= t.q3
                                                      for t in segment.seconds.values())
    widest = max(timing.transfers, key=lambda t: t.raw_bytes)
    raw, packed = widest.codecs["raw"], widest.codecs["int8+zstd"]
    assert raw.bytes >= widest.raw_bytes and packed.bytes < raw.bytes / 3
    assert timing.transfers[0].raw_bytes == 64 * 4


def test_idle_factors_compare_paired_calls_and_never_fall_with_a_longer_pause() -> None:
    """A call that runs twice as long after more than 5 ms of rest: the factor says so from that pause on."""
    last_finished = [0.0]

    def call() -> None:
        rested = time.perf_counter() - last_finished[0]
        time.sleep(0.004 if rested > 0.005 else 0.002)
        last_finished[0] = time.perf_counter()

    factors = measure_idle_factors(call, warmup=1, gaps=(0.001, 0.01, 0.03), rounds=5)
    assert list(factors) == [0.001, 0.01, 0.03]
    assert 1.0 <= factors[0.001] < 1.4, factors
    assert 1.6 < factors[0.01] <= factors[0.03] < 2.5, factors
