"""The planner's chain from a cluster file: tiers, links, measured figures and links past a skipped tier."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from splitexit.config import ClusterSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import ConfigError
from splitexit.plan.prediction import predict
from splitexit.plan.topology import LinkEstimate, Topology, topology_from_cluster
from synthetic import THREE_TIER_CLUSTER, synthetic_profile


def test_topology_comes_from_the_cluster_file_and_measured_links_plug_in() -> None:
    cluster = ClusterSpec.model_validate(yaml.safe_load(THREE_TIER_CLUSTER))
    topology = topology_from_cluster(cluster)
    assert [t.nodes for t in topology.tiers] == [("edge",), ("cloud1",), ("cloud2",)]
    assert [t.compute_scale for t in topology.tiers] == [8.0, 1.0, 1.0]
    assert topology.links[0].bandwidth == 20e6 and topology.links[0].latency == 0.01
    assert topology.links[0].emulated and topology.link(0, 2).emulated, "emulated links pay for late-waking sleeps"
    costs = topology.costs
    assert costs.per_message(topology.links[0]) == costs.message_overhead + costs.emulation_overhead
    assert costs.per_message(LinkEstimate(1e9, 0.001)) == costs.message_overhead
    assert topology.costs.max_batch == 4
    measured = LinkEstimate(5e6, 0.03, origin="measured")
    plugged = topology_from_cluster(cluster, measured_links={("edge", "cloud1"): measured})
    assert plugged.links[0] == replace(measured, codecs=("int8+zstd",)), "measured figures, the file's codec"
    assert plugged.links[1] == topology.links[1]


def test_a_declared_or_measured_link_past_a_skipped_tier_is_used_as_the_runtime_uses_it() -> None:
    spec = yaml.safe_load(THREE_TIER_CLUSTER)
    spec["links"].append({"from": "edge", "to": "cloud2", "bandwidth": "100Mbit", "latency": "2ms"})
    cluster = ClusterSpec.model_validate(spec)
    topology = topology_from_cluster(cluster)
    direct = topology.link(0, 2)
    assert (direct.bandwidth, direct.latency) == (100e6, 0.002), "the file's direct link, not the hops composed"
    assert topology.link(0, 2) == LinkEstimate.from_spec(cluster.link("edge", "cloud2")), "as the runtime sends"
    assert [(a, b) for a, b, _ in topology.named_links()] == [("edge", "cloud1"), ("cloud1", "cloud2"),
                                                              ("edge", "cloud2")]
    profile = synthetic_profile(3)
    skip = [(0, MODEL_INPUT, profile.cuts[1]), (2, profile.cuts[1], MODEL_OUTPUT)]
    file_only = topology_from_cluster(ClusterSpec.model_validate(yaml.safe_load(THREE_TIER_CLUSTER)))
    composed = predict(profile, file_only, skip, (0,), ["raw"])
    assert predict(profile, topology, skip, (0,), ["raw"]).latency_ms < composed.latency_ms

    dropped = LinkEstimate(1e5, 0.002, origin="measured")
    measured = topology_from_cluster(cluster, measured_links={("edge", "cloud2"): dropped})
    assert measured.link(0, 2) == dropped and measured.links[0] == topology.links[0]
    slow = predict(profile, measured, skip, (0,), ["raw"])
    assert slow.latency_ms > 2 * composed.latency_ms, "a measured drop on the direct link reaches the prediction"
    undeclared = topology_from_cluster(ClusterSpec.model_validate(yaml.safe_load(THREE_TIER_CLUSTER)),
                                       measured_links={("edge", "cloud2"): dropped})
    assert undeclared.link(0, 2) == dropped, "what the runtime measured over composed hops counts too"

    swept = topology.with_bandwidth(1e6)
    assert swept.links[0].bandwidth == 1e6 and swept.link(0, 2).bandwidth == 1e6, "every uplink of the edge"
    assert swept.links[1] == topology.links[1]
    with pytest.raises(ConfigError, match="skip a tier"):
        Topology(topology.tiers, topology.links, direct={(0, 1): direct})



PINNED = """
nodes:
  - {name: edge, role: edge, slowdown: 2}
  - {name: cloud1, address: 127.0.0.1:50061}
  - {name: cloud2, address: 127.0.0.1:50062}
links:
  - {from: edge, to: cloud1, bandwidth: 2Mbit, latency: 5ms%s}
  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms, codec: int8+zstd}
"""


def test_a_link_that_names_its_codec_keeps_it_and_the_others_may_choose() -> None:
    """A slow uplink would go int8+zstd (the other link names it, so it is in the plan's set); an uplink that
    says `codec: raw` must stay raw (issue 15: the planner pooled codecs named anywhere)."""
    from splitexit.control.replan import file_codecs
    from splitexit.plan.search import plan

    profile = synthetic_profile(3)

    def uplink_codecs(extra: str) -> set[str]:
        cluster = ClusterSpec.model_validate(yaml.safe_load(PINNED % extra))
        topology = topology_from_cluster(cluster)
        result = plan(profile, topology, codecs=file_codecs(cluster), top=20)
        return {link.codec for p in result.candidates for link in p.links
                if (link.source, link.target) == ("edge", "cloud1")}

    assert "int8+zstd" in uplink_codecs(""), "free to choose, the slow uplink compresses"
    assert uplink_codecs(", codec: raw") == {"raw"}
    measured = topology_from_cluster(ClusterSpec.model_validate(yaml.safe_load(PINNED % ", codec: raw")),
                                     measured_links={("edge", "cloud1"): LinkEstimate(1e6, 0.01, origin="measured")})
    assert measured.links[0].codecs == ("raw",) and measured.links[0].bandwidth == 1e6, "measured figures, file codec"
