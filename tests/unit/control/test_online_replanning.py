"""The entry's re-planner: measured links and measured stage compute move the plan, noise does not."""

from __future__ import annotations

import pytest
import yaml

from splitexit.config import ClusterSpec
from splitexit.control.replan import HOLD, PlanningPlacer, Replanner
from synthetic import synthetic_profile

CLUSTER = """
nodes:
  - {name: edge, role: edge, slowdown: 6}
  - {name: cloud1, address: 127.0.0.1:50061}
  - {name: cloud2, address: 127.0.0.1:50062}
links:
  - {from: edge, to: cloud1, bandwidth: 1Gbit, latency: 1ms}
  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms}
batching: {max_batch: 1}
"""


def planned_layout(seed: int = 2) -> PlanningPlacer:
    placer = PlanningPlacer(None, synthetic_profile(seed))  # type: ignore[arg-type] - no placement is built here
    placer.cluster = ClusterSpec.model_validate(yaml.safe_load(CLUSTER))
    placer.current = placer.best()
    return placer


def replanner(placer: PlanningPlacer, compute: dict[str, float]) -> tuple[Replanner, list[str]]:
    asked: list[str] = []
    return Replanner(placer, asked.append, dict, measure_compute=lambda: compute), asked


def test_a_stage_that_computes_far_slower_than_predicted_moves_the_plan() -> None:
    placer = planned_layout()
    first = placer.current
    assert first is not None and first.stages[-1].compute_ms > 0
    slow = first.stages[-1]  # the cloud stage that answers last
    measured = {node: 20 * slow.compute_ms / 1e3 for node in slow.nodes}
    planner, asked = replanner(placer, measured)
    assert planner.check(100.0) is None, "a better plan must stay better for the hold time first"
    reason = planner.check(100.0 + HOLD)
    assert reason is not None and asked == [reason]
    assert f"{slow.nodes[0]} computed" in reason and "predicted" in reason
    assert placer.slowdowns[slow.nodes[0]] == pytest.approx(20.0, rel=0.01)
    assert slow.nodes[0] not in {n for s in placer.best().stages for n in s.nodes}, \
        "the new best plan avoids the node that computes 20x slower"


def test_compute_within_the_noise_band_changes_nothing() -> None:
    placer = planned_layout()
    stages = placer.current.stages  # type: ignore[union-attr]
    measured = {s.nodes[0]: 1.3 * s.compute_ms / 1e3 for s in stages}
    planner, asked = replanner(placer, measured)
    assert planner.check(100.0) is None and planner.check(100.0 + HOLD) is None
    assert placer.slowdowns == {} and asked == []
