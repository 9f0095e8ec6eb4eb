"""The one route text: placements, plans and the plan table all print stages through `describe_route`."""

from __future__ import annotations

from splitexit.model.stages import INPUT
from splitexit.plan.result import describe_route
from splitexit.runtime.placement import Placement, StagePlacement

CHAIN = (StagePlacement(0, ("edge",), None, 3), StagePlacement(1, ("cloud1", "cloud1b"), 3, None))
SKIPPED_EDGE = (StagePlacement(0, ("edge",), None, INPUT), StagePlacement(1, ("cloud1",), INPUT, None))


def test_full_form_names_every_bound() -> None:
    assert describe_route(CHAIN) == "edge[input..cut 3] → cloud1|cloud1b[cut 3..output]"
    assert describe_route(SKIPPED_EDGE) == "edge[input..input] → cloud1[input..output]"


def test_compact_form_for_tables() -> None:
    assert describe_route(CHAIN, compact=True) == "edge[in..3] cloud1|cloud1b[3..out]"
    assert describe_route(SKIPPED_EDGE[1:], compact=True) == "cloud1[in..out]"


def test_placement_adds_codecs_and_disabled_exits() -> None:
    placement = Placement(CHAIN, version=1, codecs=("fp16", None), disabled_exits=frozenset({1}))
    assert placement.describe() == "edge[input..cut 3] → cloud1|cloud1b[cut 3..output] (codecs fp16) (exits 1 off)"
