"""Plans become placements: ranges, codecs, disabled exits, an edge that forwards the input, live tiers only."""

from __future__ import annotations

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model
from splitexit.config import ClusterSpec
from splitexit.control.replan import _live, file_codecs, placement_from_plan
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.plan.result import PlannedLink, PlannedStage


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn")).eval()
    net.set_policy(ExitPolicy(temperatures=(1.0,) * net.num_exits, thresholds=(0.5,) * len(net.exit_cuts)))
    return net


def cluster(**extra: object) -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": "127.0.0.1:50001"},
                  {"name": "cloud2", "address": "127.0.0.1:50002"}], **extra})))


class FakePlan:
    """The fields of planner.Plan that placement_from_plan reads."""

    def __init__(self, stages, links, active_exits, edge_computes=True):  # noqa: ANN001
        self.stages, self.links, self.active_exits = stages, links, active_exits
        self.edge_computes, self.objective, self.latency_ms = edge_computes, "latency", 12.5


def test_a_cloud_only_plan_has_the_edge_forward_the_input(net: EarlyExitNet) -> None:
    chosen = FakePlan((PlannedStage(2, ("cloud2",), MODEL_INPUT, MODEL_OUTPUT),),
                      (PlannedLink(0, 2, "edge", "cloud2", MODEL_INPUT, "int8+zstd", 64.0),), (0,), edge_computes=False)
    placement = placement_from_plan(net, cluster(), chosen)
    assert placement.predicted_ms == 12.5, "the placement carries the planner's prediction to the run report"
    assert [(s.nodes, s.start, s.end) for s in placement.stages] == [(("edge",), MODEL_INPUT, MODEL_INPUT),
                                                                     (("cloud2",), MODEL_INPUT, MODEL_OUTPUT)]
    assert placement.codecs == ("int8+zstd", None)
    assert placement.disabled_exits == frozenset({1}), "exit 1 is not in the plan's active exits"


def test_versions_differ_when_only_codecs_or_exits_differ(net: EarlyExitNet) -> None:
    cut = net.exit_cuts[0].id
    stages = (PlannedStage(0, ("edge",), MODEL_INPUT, cut), PlannedStage(1, ("cloud1",), cut, MODEL_OUTPUT))
    def link(codec: str) -> PlannedLink:
        return PlannedLink(0, 1, "edge", "cloud1", cut, codec, 1.0)
    versions = {placement_from_plan(net, cluster(), FakePlan(stages, (link(c),), exits)).version
                for c in ("raw", "fp16") for exits in ((0,), (0, 1))}
    assert len(versions) == 4


def test_live_cluster_keeps_each_nodes_tier() -> None:
    live = _live(cluster(), {"cloud2"})
    assert [n.name for n in live.nodes] == ["edge", "cloud2"]
    assert live.tier_by_name() == {"edge": 0, "cloud2": 2}


def test_the_planner_only_picks_codecs_the_file_names() -> None:
    assert file_codecs(cluster()) is None, "a file that names no codec leaves the choice to the planner"
    links = [{"from": "edge", "to": "cloud1", "codec": "int8+zstd"}, {"from": "cloud1", "to": "cloud2", "codec": "raw"}]
    assert file_codecs(cluster(links=links)) == ("int8+zstd", "raw")
    assert file_codecs(cluster(links=[{"from": "edge", "to": "cloud1", "codec": "raw"}])) == ("raw",)
    assert file_codecs(cluster(links=[{"from": "edge", "to": "cloud1", "codec": "auto"}])) is None
