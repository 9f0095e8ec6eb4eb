"""What comes back up a stream: every row's result or error survives the wire, each row of a refusal is named."""

from __future__ import annotations

from splitexit.errors import WireError
from splitexit.runtime.hop import RowError, RowResult
from splitexit.runtime.stream_messages import decode_up, encode_outcome, encode_rejection
from splitexit.wire import wire_pb2


def test_results_and_errors_survive_the_wire_and_get_a_received_stamp() -> None:
    result = RowResult(7, exit=1, prediction=3, confidence=0.75, logits=[0.5, -1.25, 2.0], node="cloud1",
                       trace=[("edge", "sent", 1.5), ("cloud1", "received", 1.625)])
    error = RowError(8, "stage_failed", "RuntimeError: boom", "cloud2")
    (got_result,) = decode_up(wire_pb2.Up.FromString(encode_outcome(result).SerializeToString()), "edge")
    assert isinstance(got_result, RowResult)
    assert got_result.trace[:-1] == result.trace and got_result.trace[-1][:2] == ("edge", "received")
    assert got_result == RowResult(**{**result.__dict__, "trace": got_result.trace})
    assert decode_up(encode_outcome(error), "edge") == [error]


def test_a_rejection_answers_every_row_of_the_batch() -> None:
    up = encode_rejection([4, 5, 6], WireError("too big", code="too_large"), "cloud1")
    assert decode_up(up, "edge") == [RowError(i, "too_large", "too big", "cloud1") for i in (4, 5, 6)]
    assert decode_up(encode_rejection([], WireError("garbage"), "cloud1"), "edge") == [], "no rows named, none answered"
