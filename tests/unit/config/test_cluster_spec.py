"""ClusterSpec: tiers, links (a skipped tier's links in series), codec names, and what a cluster file may not say."""

from __future__ import annotations

import math

import pytest
import yaml
from pydantic import ValidationError

from splitexit.config import DEFAULT_CODEC, DEFAULT_REGISTRATION_TTL, ClusterSpec, EtcdSpec, LinkSpec
from splitexit.errors import ConfigError


def cluster(text: str) -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(text))


EDGE_AND_TWO = """
nodes:
  - {name: edge, role: edge}
  - {name: a, address: "127.0.0.1:50061"}
  - {name: b, address: "127.0.0.1:50062"}
"""

REPLICAS = """
nodes:
  - {name: edge, role: edge}
  - {name: a1, address: "127.0.0.1:50061"}
  - {name: a2, address: "127.0.0.1:50062", tier: 1}
  - {name: b, address: "127.0.0.1:50063"}
  - {name: c, address: "127.0.0.1:50064"}
links:
  - {from: edge, to: a1, bandwidth: 20Mbit, latency: 10ms, jitter: 1ms, loss: 0.1, codec: fp16}
  - {from: a1, to: b, bandwidth: 100Mbit, latency: 5ms, loss: 0.2}
  - {from: b, to: c, latency: 2ms}
"""


MANY_EDGES = """
nodes:
  - {name: camera, role: edge}
  - {name: phone, role: edge}
  - {name: a1, address: "127.0.0.1:50061"}
  - {name: a2, address: "127.0.0.1:50062", tier: 1}
  - {name: b, address: "127.0.0.1:50063"}
links:
  - {from: camera, to: a1, bandwidth: 5Mbit}
  - {from: phone, to: a1, bandwidth: 50Mbit}
  - {from: phone, to: a2, bandwidth: 40Mbit}
"""


def test_a_file_may_declare_several_edges_and_each_sees_only_itself() -> None:
    spec = cluster(MANY_EDGES)
    assert [e.name for e in spec.edges] == ["camera", "phone"]
    assert spec.tier_by_name() == {"camera": 0, "phone": 0, "a1": 1, "a2": 1, "b": 2}
    phone = spec.for_edge("phone")
    assert phone.edge.name == "phone"
    assert [n.name for n in phone.nodes] == ["phone", "a1", "a2", "b"]
    assert [(link.source, link.target) for link in phone.links] == [("phone", "a1"), ("phone", "a2")]
    assert phone.link("phone", "a1").bandwidth == 50e6
    assert spec.for_edge("camera").link("camera", "a1").bandwidth == 5e6
    assert phone.edge_names == spec.edge_names == {"camera", "phone"}  # the view still knows the others
    single = cluster(EDGE_AND_TWO)
    assert single.for_edge(None) is single and single.for_edge("edge").edge.name == "edge"


def test_with_several_edges_the_edge_must_be_named() -> None:
    spec = cluster(MANY_EDGES)
    with pytest.raises(ConfigError, match=r"2 edges \(camera, phone\).*--edge NAME"):
        spec.for_edge(None)
    with pytest.raises(ConfigError, match=r"2 edges \(camera, phone\).*--edge NAME"):
        _ = spec.edge
    with pytest.raises(ConfigError, match=r"--edge phon: .*no edge of that name.*did you mean 'phone'"):
        spec.for_edge("phon")
    with pytest.raises(ConfigError, match="no edge of that name"):
        spec.for_edge("a1")  # a worker is no edge


def test_workers_without_a_tier_follow_the_node_before_them() -> None:
    spec = cluster(EDGE_AND_TWO)
    assert spec.tier_by_name() == {"edge": 0, "a": 1, "b": 2}
    assert spec.edge.name == "edge" and spec.node("b").address == "127.0.0.1:50062"
    with pytest.raises(KeyError):
        spec.node("nobody")


def test_workers_of_one_tier_are_replicas_in_file_order() -> None:
    spec = cluster(REPLICAS)
    assert spec.tier_by_name() == {"edge": 0, "a1": 1, "a2": 1, "b": 2, "c": 3}
    assert {t: [n.name for n in nodes] for t, nodes in spec.tiers().items()} == {
        0: ["edge"], 1: ["a1", "a2"], 2: ["b"], 3: ["c"]}


def test_a_link_of_the_file_is_returned_as_written() -> None:
    link = cluster(REPLICAS).link("edge", "a1")
    assert (link.source, link.target) == ("edge", "a1")
    assert link.bandwidth == 20e6 and link.latency == pytest.approx(0.010) and link.jitter == pytest.approx(0.001)
    assert link.codec == "fp16" and link.emulated


def test_a_link_the_file_does_not_name_is_unemulated_with_the_cluster_codec() -> None:
    spec = cluster(EDGE_AND_TWO + "codec: int8+lz4\n")
    link = spec.link("edge", "a")
    assert not link.emulated and link.codec == "int8+lz4"
    assert cluster(EDGE_AND_TWO).link("a", "b").codec == DEFAULT_CODEC


def test_a_link_past_a_skipped_tier_is_the_links_through_it_in_series() -> None:
    spec = cluster(REPLICAS)
    link = spec.link("edge", "b")  # through tier 1's first node, a1
    assert (link.source, link.target) == ("edge", "b")
    assert link.bandwidth == 20e6  # the narrower
    assert link.latency == pytest.approx(0.015) and link.jitter == pytest.approx(0.001)
    assert link.loss == pytest.approx(1 - 0.9 * 0.8)
    assert link.codec == "fp16"  # the first hop's
    longer = spec.link("edge", "c")
    assert longer.latency == pytest.approx(0.017) and longer.bandwidth == 20e6
    assert longer.loss == pytest.approx(1 - 0.9 * 0.8)


def test_a_file_link_between_non_neighbours_wins_over_the_series() -> None:
    spec = cluster(REPLICAS + "  - {from: edge, to: b, latency: 50ms}\n")
    link = spec.link("edge", "b")
    assert link.latency == pytest.approx(0.050) and link.bandwidth is None and link.codec == DEFAULT_CODEC


def test_skipping_unemulated_tiers_gives_an_unemulated_link() -> None:
    spec = cluster(EDGE_AND_TWO + "codec: bf16\n")
    link = spec.link("edge", "b")
    assert not link.emulated and link.codec == "bf16"


def test_link_changes_apply_in_order() -> None:
    link = LinkSpec.model_validate({"from": "edge", "to": "a", "bandwidth": "10Mbit", "latency": "1ms",
                                    "changes": [{"at": "2s", "bandwidth": "1Mbit"}, {"at": 5, "latency": "20ms"}]})
    assert link.conditions(0.0) == (10e6, pytest.approx(0.001))
    assert link.conditions(2.0) == (1e6, pytest.approx(0.001))
    assert link.conditions(6.0) == (1e6, pytest.approx(0.020))
    with pytest.raises(ValidationError, match="in order of `at`"):
        LinkSpec.model_validate({"from": "edge", "to": "a", "changes": [{"at": 5}, {"at": 1}]})


@pytest.mark.parametrize("name", ["raw", "fp16", "bf16", "int8", "int8c", "auto", "raw+lz4", "int8c+zstd",
                                  " FP16+LZ4 "])
def test_known_codec_names_are_accepted_and_normalised(name: str) -> None:
    expected = name.strip().lower()
    assert cluster(EDGE_AND_TWO + f"codec: '{name}'\n").codec == expected
    assert LinkSpec.model_validate({"from": "edge", "to": "a", "codec": name}).codec == expected


@pytest.mark.parametrize("name", ["gzip", "fp32", "int8+gzip", "auto+lz4", "raw+", "+lz4", ""])
def test_unknown_codec_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="unknown codec"):
        cluster(EDGE_AND_TWO + f"codec: '{name}'\n")
    with pytest.raises(ValidationError, match="unknown codec"):
        LinkSpec.model_validate({"from": "edge", "to": "a", "codec": name})


@pytest.mark.parametrize("text, where", [
    (EDGE_AND_TWO + "windw: 4\n", "windw"),
    (EDGE_AND_TWO + "batching: {max_batch: 4, maxwait: 1ms}\n", "maxwait"),
    (EDGE_AND_TWO + "security: {tokn: abc}\n", "tokn"),
    (EDGE_AND_TWO + "retry: {first: 1s}\n", "first"),
    ("nodes:\n  - {name: edge, role: edge, colour: red}\n", "colour"),
    (EDGE_AND_TWO + "links:\n  - {from: edge, to: a, bandwith: 1Mbit}\n", "bandwith"),
    (EDGE_AND_TWO + "registry: {etcd: ['127.0.0.1:2379'], prefx: /x/}\n", "prefx"),
])
def test_unknown_keys_are_refused(text: str, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        cluster(text)


@pytest.mark.parametrize("text, message", [
    ("nodes:\n  - {name: a, address: '127.0.0.1:1'}\n", "edges .role: edge. come first"),
    (EDGE_AND_TWO + "  - {name: e2, role: edge}\n", "edges .role: edge. come first"),
    (EDGE_AND_TWO + "  - {name: a, address: '127.0.0.1:50070'}\n", "unique"),
    ("nodes:\n  - {name: edge, role: edge}\n  - {name: a, address: localhost}\n", "address like"),
    ("nodes:\n  - {name: edge, role: edge}\n  - {name: a, address: '127.0.0.1:70000'}\n", "address like"),
    ("nodes:\n  - {name: edge, role: edge}\n  - {name: a}\n", "address like"),
    ("nodes:\n  - {name: edge, role: edge, tier: 2}\n", "tier 0"),
    ("nodes:\n  - {name: edge, role: edge}\n  - {name: a, address: '127.0.0.1:1', tier: 2}\n", "without gaps"),
    ("nodes:\n  - {name: 'bad name', role: edge}\n", "name"),
    (REPLICAS.replace("tier: 1}", "tier: 1, ends_at: 3}"), None),  # one replica naming an end is fine
    (REPLICAS.replace('"127.0.0.1:50061"}', '"127.0.0.1:50061", ends_at: 2}')
     .replace("tier: 1}", "tier: 1, ends_at: 3}"), "must agree on `ends_at`"),
    (EDGE_AND_TWO + "links:\n  - {from: b, to: a}\n", "later tier"),
    (EDGE_AND_TWO + "links:\n  - {from: edge, to: ghost}\n", "later tier"),
    (EDGE_AND_TWO + "window: 0\n", "window"),
    (EDGE_AND_TWO + "message_limit: 10b\n", "message_limit"),
    (EDGE_AND_TWO + "security: {token: short}\n", "token"),
    (EDGE_AND_TWO + "security: {token: 0123456789abcdef, token_file: t}\n", "not both"),
])
def test_inconsistent_clusters_are_refused(text: str, message: str | None) -> None:
    if message is None:
        cluster(text)
        return
    with pytest.raises(ValidationError, match=message):
        cluster(text)


def test_units_in_the_file_are_parsed() -> None:
    spec = cluster(EDGE_AND_TWO + "message_limit: 4MiB\nbatching: {max_wait: 5ms}\nretry: {timeout: 2s, "
                                  "first_wait: 10ms}\n")
    assert spec.message_limit == 4 * 1024 * 1024
    assert spec.batching.max_wait == pytest.approx(0.005)
    assert spec.retry.timeout == 2.0 and spec.retry.first_wait == pytest.approx(0.010)


def test_etcd_registry_checks_endpoints_and_credentials() -> None:
    etcd = EtcdSpec.model_validate({"etcd": "10.0.0.5:2379", "prefix": "/mine"})
    assert etcd.etcd == ("10.0.0.5:2379",) and etcd.prefix == "/mine/"
    for bad, message in [({"etcd": ["http://10.0.0.5:2379"]}, "host:port"),
                         ({"etcd": ["a:2379"], "user": "root"}, "needs a `password`"),
                         ({"etcd": ["a:2379"], "password": "x"}, "needs a `user`"),
                         ({"etcd": ["a:2379"], "user": "u", "password": "x", "password_file": "f"}, "not both"),
                         ({"etcd": ["a:2379"], "tls": {"ca": "ca.pem", "cert": "c.pem"}}, "both `cert` and `key`"),
                         ({"etcd": ["a:2379"], "ttl": 1}, "ttl")]:
        with pytest.raises(ValidationError, match=message):
            EtcdSpec.model_validate(bad)
    assert math.isclose(EtcdSpec.model_validate({"etcd": ["a:1"]}).ttl, DEFAULT_REGISTRATION_TTL)
