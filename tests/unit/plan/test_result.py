"""apply_plan: the cluster file that serves a plan, from predictions on cluster files."""

from __future__ import annotations

import math

import pytest
import yaml

from splitexit.config import ClusterSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import ConfigError
from splitexit.plan.prediction import predict
from splitexit.plan.result import apply_plan
from splitexit.plan.topology import topology_from_cluster
from synthetic import THREE_TIER_CLUSTER, synthetic_profile


def test_apply_plan_writes_ends_codecs_and_drops_skipped_workers() -> None:
    cluster = ClusterSpec.model_validate(yaml.safe_load(THREE_TIER_CLUSTER))
    profile = synthetic_profile(1)
    topology = topology_from_cluster(cluster)
    stages = [(0, MODEL_INPUT, profile.cuts[1]), (2, profile.cuts[1], MODEL_OUTPUT)]
    skip_middle = predict(profile, topology, stages, (0, 1), ["int8+zstd"])
    served = apply_plan(cluster, skip_middle)
    assert [n.name for n in served.nodes] == ["edge", "cloud2"]
    assert served.node("edge").ends_at == profile.cuts[1] and served.node("cloud2").ends_at is None
    (link,) = served.links
    assert (link.source, link.target, link.codec) == ("edge", "cloud2", skip_middle.links[0].codec)
    assert link.bandwidth == 20e6 and math.isclose(link.latency, 0.011) and link.jitter == 0.001
    assert math.isclose(link.loss, 0.01)
    assert served.batching == cluster.batching

    everything = predict(profile, topology, [(0, MODEL_INPUT, profile.cuts[0]), (1, profile.cuts[0], profile.cuts[2]),
                                             (2, profile.cuts[2], MODEL_OUTPUT)], (), ["raw", "int8+zstd"])
    served = apply_plan(cluster, everything)
    assert [n.ends_at for n in served.nodes] == [profile.cuts[0], profile.cuts[2], None]
    assert [link.codec for link in served.links] == ["raw", "int8+zstd"]
    assert served.links[0].bandwidth == 20e6 and served.links[1].loss == 0.01

    cloud_only = predict(profile, topology, [(1, MODEL_INPUT, MODEL_OUTPUT)], (), ["raw"])
    served = apply_plan(cluster, cloud_only)
    assert [(n.name, n.ends_at) for n in served.nodes] == [("edge", "input"), ("cloud1", None)]

    edge_only = predict(profile, topology, [(0, MODEL_INPUT, MODEL_OUTPUT)], (), [])
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
    stages = [(0, MODEL_INPUT, profile.cuts[1]), (2, profile.cuts[1], MODEL_OUTPUT)]
    chosen = predict(profile, topology, stages, (), ["raw"])
    served = apply_plan(cluster, chosen)
    assert [(n.name, n.tier) for n in served.nodes] == [("edge", None), ("b1", 1), ("b2", 1)]
    assert [(link.source, link.target) for link in served.links] == [("edge", "b1"), ("edge", "b2")]
    assert [round(link.latency, 6) for link in served.links] == [0.006, 0.007], "composed along each replica's own hop"
    assert all(link.bandwidth == 10e6 for link in served.links)
    with pytest.raises(ConfigError, match="tier"):
        apply_plan(ClusterSpec.model_validate(yaml.safe_load(THREE_TIER_CLUSTER)), chosen)


