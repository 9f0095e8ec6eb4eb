"""What comes back up a connection: every row's result or error survives the wire, each row of a refusal is
named, large answers split into frames under the metadata limit, and a peer's oversized fields are refused."""

from __future__ import annotations

import pytest

from splitexit.errors import WireError
from splitexit.runtime.hop import RowError, RowResult
from splitexit.runtime.result_messages import (
    MAX_LOGITS,
    RESULTS_PER_FRAME,
    decode_results,
    rejection_metadata,
    results_metadata,
)
from splitexit.wire import wire_pb2
from splitexit.wire.data_messages import MAX_STAMPS
from splitexit.wire.framing import FrameLimits


def test_results_and_errors_survive_the_wire_and_get_a_received_stamp() -> None:
    result = RowResult(7, exit=1, prediction=3, confidence=0.75, logits=[0.5, -1.25, 2.0], node="cloud1",
                       trace=[("edge", "sent", 1.5), ("cloud1", "received", 1.625)])
    error = RowError(8, "stage_failed", "RuntimeError: boom", "cloud2")
    (metadata,) = results_metadata([result, error])
    got_result, got_error = decode_results(metadata, "edge")
    assert isinstance(got_result, RowResult)
    assert got_result.trace[:-1] == result.trace and got_result.trace[-1][:2] == ("edge", "received")
    assert got_result == RowResult(**{**result.__dict__, "trace": got_result.trace})
    assert got_error == error


def test_a_rejection_answers_every_row_of_the_batch() -> None:
    metadata = rejection_metadata([4, 5, 6], WireError("too big", code="too_large"), "cloud1")
    assert decode_results(metadata, "edge") == [RowError(i, "too_large", "too big", "cloud1") for i in (4, 5, 6)]
    assert decode_results(rejection_metadata([], WireError("garbage"), "cloud1"), "edge") == [], \
        "no rows named, none answered"


def test_many_answers_split_into_frames_below_the_metadata_limit() -> None:
    rows = [RowResult(i, 0, 1, 0.5, [0.25] * 1000, "cloud1", [("edge", "sent", 1.0)]) for i in range(200)]
    frames = results_metadata(rows)
    assert len(frames) > 1 and all(len(f) <= RESULTS_PER_FRAME + 8 * 1024 for f in frames)
    assert max(map(len, frames)) < FrameLimits().metadata
    decoded = [o for f in frames for o in decode_results(f, "edge")]
    assert [o.request_id for o in decoded] == list(range(200))


def test_our_own_answers_are_bounded_before_they_travel() -> None:
    """A long trace keeps its last MAX_STAMPS steps; a classifier of too many classes travels without logits."""
    long = RowResult(1, 0, 1, 0.5, [0.0] * (MAX_LOGITS + 1), "cloud1", [("n", "e", float(i)) for i in range(500)])
    (got,) = decode_results(results_metadata([long])[0], "edge")
    assert isinstance(got, RowResult)
    assert got.logits == [] and len(got.trace) == MAX_STAMPS + 1 and got.trace[-2] == ("n", "e", 499.0)


@pytest.mark.parametrize("hostile", [
    wire_pb2.Up(results=[wire_pb2.Result(request_id=1, logits=[0.0] * (MAX_LOGITS + 1))]),
    wire_pb2.Up(results=[wire_pb2.Result(request_id=1, trace=[wire_pb2.Stamp(node="n", event="e")] * 65)]),
    wire_pb2.Up(results=[wire_pb2.Result(request_id=1, trace=[wire_pb2.Stamp(node="n" * 65, event="e")])]),
    wire_pb2.Up(results=[wire_pb2.Result(request_id=1, trace=[wire_pb2.Stamp(node="n", time=float("nan"))])]),
], ids=["logits", "stamps", "long_name", "nan_time"])
def test_a_peers_oversized_answer_is_refused(hostile: wire_pb2.Up) -> None:
    with pytest.raises(WireError) as caught:
        decode_results(hostile.SerializeToString(), "edge")
    assert caught.value.code == "bad_message"


def test_bytes_that_are_no_results_are_refused() -> None:
    with pytest.raises(WireError, match="not a valid Up"):
        decode_results(b"\xff\xff\xff not protobuf", "edge")
