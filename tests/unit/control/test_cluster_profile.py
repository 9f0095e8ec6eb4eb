"""What `profile --cluster` keeps from nodes and links: checked replies, link figures only while they still match."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import yaml

from splitexit.config import ClusterSpec
from splitexit.control.cluster_profile import (
    _link_key,
    links_to_measure,
    node_machine,
    stored_link_estimates,
)
from splitexit.errors import ClusterError
from splitexit.plan.profile import MachineProfile, MeasuredLink
from splitexit.plan.topology import RuntimeCosts, topology_from_cluster
from splitexit.runtime.control_messages import NodeProfile, NodeTiming, decode_node_profile, encode_node_profile
from splitexit.runtime.node_profile import node_timing
from splitexit.wire import wire_pb2
from synthetic import synthetic_profile

CLUSTER = """
nodes:
  - {name: edge, role: edge, slowdown: 8}
  - {name: cloud1, address: "127.0.0.1:50061"}
  - {name: cloud1b, address: "127.0.0.1:50063", tier: 1}
  - {name: cloud2, address: "127.0.0.1:50062"}
  - {name: cloud3, address: "127.0.0.1:50064"}
links:
  - {from: edge, to: cloud1, bandwidth: 20Mbit, latency: 10ms, jitter: 2ms}
  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms}
  - {from: edge, to: cloud3, bandwidth: 5Mbit, latency: 30ms}
"""


def cluster(text: str = CLUSTER) -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(text))


def test_the_links_probed_are_the_ones_the_planner_prices() -> None:
    assert links_to_measure(cluster()) == [("edge", "cloud1"), ("cloud1", "cloud2"), ("cloud2", "cloud3"),
                                           ("edge", "cloud3")]


def wire_reply(machine: MachineProfile) -> wire_pb2.ProfileReply:
    """A node's timing of ``machine`` as the wire carries it."""
    return encode_node_profile(NodeProfile(machine="m", timing=node_timing(machine)))


def received(reply: wire_pb2.ProfileReply) -> NodeTiming | None:
    return decode_node_profile(reply).timing


def test_a_node_timing_is_taken_only_when_it_answers_what_was_asked() -> None:
    local = synthetic_profile(0).timing
    node = replace(local, segments=tuple(replace(s, seconds={b: replace(t, median=t.median * 2, q1=t.q1 * 2,
                                                                        q3=t.q3 * 2) for b, t in s.seconds.items()})
                                         for s in local.segments))
    taken = node_machine(received(wire_reply(node)), local, node="cloud1", key={"machine": "m"})
    assert taken.measured_on == "cloud1" and dict(taken.key) == {"machine": "m"}
    assert [s.at(1) for s in taken.segments] == pytest.approx([2 * s.at(1) for s in local.segments])
    assert [(s.start, s.end) for s in taken.segments] == [(s.start, s.end) for s in local.segments]
    assert taken.transfers == local.transfers, "bytes and codec times stay the edge's"

    def refused(mutate) -> str:  # noqa: ANN001 - a function changing the reply
        reply = wire_reply(node)
        mutate(reply)
        with pytest.raises(ClusterError, match="node cloud1 sent an unusable profile") as caught:
            node_machine(received(reply), local, node="cloud1", key={})
        return str(caught.value)

    assert "segments" in refused(lambda r: r.segments.pop())
    assert "batch sizes" in refused(lambda r: r.heads[0].batches.pop())
    assert "not finite" in refused(lambda r: setattr(r.segments[0].batches[0].seconds, "median", math.nan))
    assert "not finite" in refused(lambda r: setattr(r.call_overhead, "q1", -1.0))
    assert "idle factor" in refused(lambda r: setattr(r.idle_factors.add(), "factor", 1e9))


def test_measured_links_plug_in_until_the_file_or_an_address_changes() -> None:
    spec = cluster()
    rtt = 0.025
    profile = replace(synthetic_profile(0), links={
        ("edge", "cloud1"): MeasuredLink("edge", "cloud1", rtt, 18e6, _link_key(spec, "edge", "cloud1")),
        ("cloud1", "cloud2"): MeasuredLink("cloud1", "cloud2", 0.004, None, _link_key(spec, "cloud1", "cloud2"))})
    estimates = stored_link_estimates(profile, spec)
    uplink = estimates[("edge", "cloud1")]
    costs = RuntimeCosts()
    assert uplink.bandwidth == 18e6 and uplink.origin == "measured" and uplink.jitter == 0.002
    # a tiny message's one-way cost in the planner is half the probe's round trip
    assert uplink.delay() + costs.per_message(uplink) == pytest.approx(rtt / 2)
    assert estimates[("cloud1", "cloud2")].bandwidth is None
    assert topology_from_cluster(spec, measured_links=estimates).links[0] == uplink

    moved = cluster(CLUSTER.replace("50061", "50071"))
    assert set(stored_link_estimates(profile, moved)) == set(), "cloud1 moved: both its links are stale"
    faster = cluster(CLUSTER.replace("bandwidth: 20Mbit", "bandwidth: 50Mbit"))
    assert set(stored_link_estimates(profile, faster)) == {("cloud1", "cloud2")}
    gone = cluster(CLUSTER.replace('  - {name: cloud2, address: "127.0.0.1:50062"}\n', "")
                   .replace("  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms}\n", ""))
    assert set(stored_link_estimates(profile, gone)) == {("edge", "cloud1")}
