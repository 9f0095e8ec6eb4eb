"""The re-planner plans off the event loop: the edge's loop keeps answering while a re-plan computes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import yaml

from splitexit.config import ClusterSpec
from splitexit.control.replan import PlanningPlacer, Replanner
from synthetic import synthetic_profile

#: Four tiers and a profile with many cuts and exits: planning it takes a good fraction of a second.
CLUSTER = """
nodes:
  - {name: edge, role: edge, slowdown: 6}
  - {name: cloud1, address: 127.0.0.1:50061}
  - {name: cloud2, address: 127.0.0.1:50062}
  - {name: cloud3, address: 127.0.0.1:50063}
links:
  - {from: edge, to: cloud1, bandwidth: 1Gbit, latency: 1ms}
  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms}
  - {from: cloud2, to: cloud3, bandwidth: 1Gbit, latency: 1ms}
batching: {max_batch: 1}
"""
CUTS = 18
#: The re-plan must take at least this long, or the test shows nothing.
MIN_REPLAN_S = 0.15
#: How often the ticker on the loop asks to wake.
TICK_S = 0.005
#: Wake-ups of the ticker during the re-plan that show the loop was free (a blocked loop: one, after it).
MIN_WAKES = 5


def large_layout() -> PlanningPlacer:
    profile = synthetic_profile(2, cuts=CUTS, exits=tuple(range(1, CUTS, 3)), samples=200,
                                codecs=("raw", "int8+zstd", "fp16"))
    placer = PlanningPlacer(None, profile)  # type: ignore[arg-type]  # no placement is built here
    placer.cluster = ClusterSpec.model_validate(yaml.safe_load(CLUSTER))
    placer.current = placer.best()
    return placer


async def ticking_while(work: asyncio.Future[Any]) -> list[float]:
    """The gaps between a ticker's wake-ups on this loop until ``work`` is done."""
    gaps: list[float] = []
    last = time.perf_counter()
    while not work.done():
        await asyncio.sleep(TICK_S)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps


def test_the_edges_loop_answers_while_a_replan_computes() -> None:
    placer = large_layout()
    asked: list[str] = []
    replanner = Replanner(placer, asked.append, lambda: {("edge", "cloud1"): 1e6})  # a link 1000x slower

    async def main() -> tuple[float, list[float]]:
        started = time.perf_counter()
        check = asyncio.ensure_future(replanner.check_in_thread(100.0))
        gaps = await ticking_while(check)
        await check
        return time.perf_counter() - started, gaps

    try:
        took, gaps = asyncio.run(main())
    finally:
        replanner.close()
    assert took >= MIN_REPLAN_S, f"the re-plan took {took:.3f} s: make the profile larger"
    # a re-plan on the loop would let the ticker wake once, after it; no timing is asserted beyond that
    assert len(gaps) >= MIN_WAKES, f"the loop woke {len(gaps)} times in a {took:.3f} s re-plan"
    assert placer.measured[("edge", "cloud1")].bandwidth == 1e6, "what the check measured is kept"


def test_a_closed_replanner_plans_no_more() -> None:
    placer = PlanningPlacer(None, synthetic_profile(2))  # type: ignore[arg-type]  # no placement is built here
    replanner = Replanner(placer, lambda reason: None, dict)
    replanner.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(replanner.check_in_thread(100.0))
