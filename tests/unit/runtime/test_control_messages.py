"""The control calls' messages: every one survives its encode and decode, and decoding checks what a node trusts."""

from __future__ import annotations

import math

import pytest

from splitexit.config import NodeSpec
from splitexit.config.codec_names import parse_codec
from splitexit.errors import ConfigError, WireError
from splitexit.plan.profile import Timing
from splitexit.runtime.control_messages import (
    Assignment,
    LinkHealth,
    NodeHealth,
    NodeProfile,
    NodeTiming,
    PeerLink,
    ProfileJob,
    decode_assign_reply,
    decode_assignment,
    decode_health,
    decode_node_profile,
    decode_probe,
    decode_profile_job,
    decode_stage_chunk,
    encode_assign_reply,
    encode_assignment,
    encode_health,
    encode_node_profile,
    encode_probe,
    encode_probe_reply,
    encode_profile_job,
    encode_stage_chunks,
)
from splitexit.wire import wire_pb2

PEERS = (NodeSpec(name="cloud2", address="127.0.0.1:50062"), NodeSpec(name="cloud2b", address="10.0.0.7:50063"))


def test_an_assignment_survives_the_wire() -> None:
    assignment = Assignment(plan_version=7, stage_sha256="ab" * 32, edge="edge", downstream=PEERS,
                            upstream=("edge", "cloud0"), codec=parse_codec("int8c+zstd"))
    assert decode_assignment(wire_pb2.AssignRequest.FromString(
        encode_assignment(assignment).SerializeToString())) == assignment
    last = Assignment(plan_version=7, stage_sha256="ab" * 32, edge="camera")
    assert decode_assignment(encode_assignment(last)) == last, "the last stage: no codec, no downstream"
    assert [decode_assign_reply(encode_assign_reply(served)) for served in (True, False)] == [True, False]


def test_a_bad_peer_or_codec_is_refused_when_decoded() -> None:
    request = encode_assignment(Assignment(plan_version=1, stage_sha256="ab" * 32, edge="edge", downstream=PEERS))
    request.downstream[0].name = "no spaces allowed"
    with pytest.raises(WireError, match="is not a valid node") as caught:
        decode_assignment(request)
    assert caught.value.code == "bad_message"
    with pytest.raises(ConfigError, match="unknown codec"):
        decode_assignment(wire_pb2.AssignRequest(plan_version=1, codec="gzip"))


def test_health_survives_the_wire() -> None:
    health = NodeHealth(node="cloud1", ready=True, plan_version=3, tier=1, queued=2, in_flight=5,
                        stages=("ab" * 32, "cd" * 32), incarnation="f00d", machine="host / torch 2",
                        links=(LinkHealth("cloud1", "cloud2", 100, 40, 3, 9, 2.5e6),
                               LinkHealth("cloud2", "cloud3", 10, 10, 1, 1, 0.0)))
    assert decode_health(wire_pb2.HealthReply.FromString(encode_health(health).SerializeToString())) == health


def test_a_profile_job_and_its_reply_survive_the_wire() -> None:
    job = ProfileJob(stage_sha256="ab" * 32, cuts=(0, 2, 5), batch_sizes=(1, 8), repeats=20, links=PEERS)
    assert decode_profile_job(wire_pb2.ProfileRequest.FromString(encode_profile_job(job).SerializeToString())) == job
    times = ((1, Timing(1e-3, 9e-4, 1.2e-3)), (8, Timing(4e-3, 3e-3, 5e-3)))
    timing = NodeTiming(call_overhead=Timing(2e-5, 1e-5, 3e-5), stage_call=times, idle_factors=((0.01, 1.4),),
                        segments=(times, times), heads=(times,))
    reply = NodeProfile(machine="host", timing=timing, links=(PeerLink("cloud2", 0.004, 9e8),
                                                             PeerLink("cloud2b", 0.001, None)))
    assert decode_node_profile(wire_pb2.ProfileReply.FromString(encode_node_profile(reply).SerializeToString())) \
        == reply
    links_only = NodeProfile(machine="host", links=reply.links)
    assert decode_node_profile(encode_node_profile(links_only)) == links_only, "no timing asked, none sent"
    missing = NodeProfile(machine="host", missing_stage=True)
    assert decode_node_profile(encode_node_profile(missing)) == missing


def test_a_stage_file_travels_in_pieces_that_name_it() -> None:
    data = bytes(range(256)) * 41
    chunks = [decode_stage_chunk(c) for c in encode_stage_chunks("ab" * 32, data, 1000)]
    assert len(chunks) == math.ceil(len(data) / 1000)
    assert {(sha, total) for sha, total, _ in chunks} == {("ab" * 32, len(data))}
    assert b"".join(piece for _, _, piece in chunks) == data


def test_a_probe_reply_counts_what_arrived() -> None:
    assert decode_probe(encode_probe_reply(encode_probe(4096))) == 4096
