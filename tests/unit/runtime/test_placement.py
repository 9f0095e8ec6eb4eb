"""The one route text: placements, plans and the plan table all print stages through `describe_route`."""

from __future__ import annotations

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.plan.result import describe_route
from splitexit.runtime.placement import PlacedStage, Placement

CHAIN = (PlacedStage(0, ("edge",), MODEL_INPUT, 3), PlacedStage(1, ("cloud1", "cloud1b"), 3, MODEL_OUTPUT))
SKIPPED_EDGE = (PlacedStage(0, ("edge",), MODEL_INPUT, MODEL_INPUT),
                PlacedStage(1, ("cloud1",), MODEL_INPUT, MODEL_OUTPUT))


def test_full_form_names_every_bound() -> None:
    assert describe_route(CHAIN) == "edge[input..cut 3] → cloud1|cloud1b[cut 3..output]"
    assert describe_route(SKIPPED_EDGE) == "edge[forwards the input] → cloud1[input..output]"


def test_compact_form_for_tables() -> None:
    assert describe_route(CHAIN, compact=True) == "edge[in..3] cloud1|cloud1b[3..out]"
    assert describe_route(SKIPPED_EDGE[1:], compact=True) == "cloud1[in..out]"
    assert describe_route(SKIPPED_EDGE, compact=True) == "edge[fwd] cloud1[in..out]"


def test_placement_adds_codecs_and_disabled_exits() -> None:
    placement = Placement(CHAIN, version=1, codecs=("fp16", None), disabled_exits=frozenset({1}))
    assert placement.describe() == "edge[input..cut 3] → cloud1|cloud1b[cut 3..output] (codecs fp16) (exits 1 off)"
