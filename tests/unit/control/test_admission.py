"""The cluster file's rules for registrations: who is believed, at which address and tier."""

from __future__ import annotations

import logging

import pytest
import yaml

from splitexit.config import ClusterSpec
from splitexit.control.admission import Proofs, judge
from splitexit.control.members import NodeInfo

CLUSTER = """
nodes:
  - {name: edge, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
  - {name: cloud2, address: "127.0.0.1:50062", tier: 2}
"""


def cluster(*, tls: bool) -> ClusterSpec:
    data = yaml.safe_load(CLUSTER)
    if tls:
        data["security"] = {"tls": "/nonexistent/certs"}  # judging reads no file
    return ClusterSpec.model_validate(data)


def info(name: str, address: str, tier: int) -> NodeInfo:
    return NodeInfo(name=name, address=address, tier=tier, incarnation="i1")


@pytest.mark.parametrize("tls", [False, True])
def test_a_file_node_keeps_the_files_tier(tls: bool) -> None:
    verdict = judge(cluster(tls=tls), info("cloud1", "127.0.0.1:50061", 5))
    assert verdict.believe is not None and verdict.believe.tier == 1 and not verdict.needs_proof


def test_without_tls_a_file_node_is_reached_at_the_files_address_whatever_it_registered() -> None:
    verdict = judge(cluster(tls=False), info("cloud1", "10.9.9.9:6666", 1))
    assert verdict.believe is not None and verdict.believe.address == "127.0.0.1:50061"
    assert not verdict.needs_proof


def test_with_tls_a_moved_file_node_must_prove_its_new_address_or_is_reached_at_the_files() -> None:
    verdict = judge(cluster(tls=True), info("cloud1", "127.0.0.1:7777", 1))
    assert verdict.needs_proof and verdict.believe is not None and verdict.believe.address == "127.0.0.1:7777"
    assert verdict.otherwise is not None and verdict.otherwise.address == "127.0.0.1:50061"


def test_without_tls_a_node_the_file_does_not_name_is_refused() -> None:
    verdict = judge(cluster(tls=False), info("evil", "127.0.0.1:6666", 2))
    assert verdict.believe is None and "security.tls" in verdict.refused


def test_with_tls_a_new_node_joins_an_existing_tier_after_proof_and_never_makes_a_tier() -> None:
    joined = judge(cluster(tls=True), info("cloud2b", "127.0.0.1:50063", 2))
    assert joined.believe is not None and joined.needs_proof and joined.otherwise is None
    new_tier = judge(cluster(tls=True), info("cloud3", "127.0.0.1:50064", 3))
    assert new_tier.believe is None and "never make new ones" in new_tier.refused


def test_a_registration_that_names_the_edge_is_refused() -> None:
    assert judge(cluster(tls=True), info("edge", "127.0.0.1:1", 1)).believe is None


def test_a_refusal_is_logged_once_per_key_and_value(caplog: pytest.LogCaptureFixture) -> None:
    proofs = Proofs()
    with caplog.at_level(logging.WARNING, logger="splitexit.control.admission"):
        for _ in range(3):
            proofs.refuse("nodes/evil", b"a", "why")
        proofs.refuse("nodes/evil", b"b", "why")
    assert [r.getMessage() for r in caplog.records] == ["not routing to registry entry nodes/evil: why"] * 2


def test_a_proof_holds_for_one_name_address_and_incarnation() -> None:
    proofs = Proofs()
    proofs.record(info("cloud2b", "127.0.0.1:50063", 2))
    assert proofs.knows(info("cloud2b", "127.0.0.1:50063", 2))
    assert not proofs.knows(info("cloud2b", "127.0.0.1:50064", 2))
    assert not proofs.knows(NodeInfo(name="cloud2b", address="127.0.0.1:50063", tier=2, incarnation="i2"))
