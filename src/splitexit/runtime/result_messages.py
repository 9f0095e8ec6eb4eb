"""What comes back up a data-plane connection: each row's :class:`~splitexit.runtime.hop.RowResult` or
:class:`~splitexit.runtime.hop.RowError`, packed into the metadata of RESULTS frames, and back.

The node encodes, the upstream client (:mod:`~splitexit.runtime.remote`) decodes; both go through here, so
the two ends cannot drift. (What goes *down* is in :mod:`splitexit.wire.data_messages`: tensors and
request ids only, no runtime types.)
"""

from __future__ import annotations

from collections.abc import Sequence

from splitexit.errors import WireError
from splitexit.runtime.hop import Outcome, RowError, RowResult, stamp
from splitexit.wire import wire_pb2
from splitexit.wire.data_messages import MAX_STAMPS, MAX_TEXT, parse, read_trace

__all__ = ["MAX_LOGITS", "decode_results", "results_metadata", "rejection_metadata"]

#: Most logits one result may carry (a classifier of more classes is answered without them).
MAX_LOGITS = 4096
#: Bytes of results one RESULTS frame carries before the next one starts (below the frame metadata limit).
RESULTS_PER_FRAME = 128 * 1024


def _message(outcome: Outcome) -> wire_pb2.Up:
    if isinstance(outcome, RowResult):
        logits = outcome.logits if len(outcome.logits) <= MAX_LOGITS else []
        return wire_pb2.Up(results=[wire_pb2.Result(
            request_id=outcome.request_id, exit=outcome.exit, prediction=outcome.prediction,
            confidence=outcome.confidence, logits=logits, node=outcome.node,
            trace=[wire_pb2.Stamp(node=n[:MAX_TEXT], event=e[:MAX_TEXT], time=t)
                   for n, e, t in outcome.trace[-MAX_STAMPS:]])])
    return wire_pb2.Up(errors=[wire_pb2.RequestError(request_ids=[outcome.request_id], code=outcome.code[:MAX_TEXT],
                                                    message=outcome.message[:1024], node=outcome.node[:MAX_TEXT])])


def results_metadata(outcomes: Sequence[Outcome]) -> list[bytes]:
    """Rows' answers (from this node or relayed from further down) as the metadata of one or more RESULTS
    frames, each at most about ``RESULTS_PER_FRAME`` bytes."""
    frames: list[bytes] = []
    current = wire_pb2.Up()
    for outcome in outcomes:
        one = _message(outcome)
        if current.ByteSize() and current.ByteSize() + one.ByteSize() > RESULTS_PER_FRAME:
            frames.append(current.SerializeToString())
            current = wire_pb2.Up()
        current.MergeFrom(one)
    if current.ByteSize():
        frames.append(current.SerializeToString())
    return frames


def rejection_metadata(ids: list[int], error: WireError, node: str) -> bytes:
    """``node`` refused the rows ``ids`` (all of one batch; none when the frame named no rows)."""
    return wire_pb2.Up(errors=[wire_pb2.RequestError(request_ids=ids, code=error.code, message=str(error)[:1024],
                                                    node=node)]).SerializeToString()


def decode_results(metadata: bytes, receiver: str) -> list[Outcome]:
    """Every row a RESULTS frame answers, checked; results get a ``received`` stamp of ``receiver``."""
    up = parse(wire_pb2.Up, metadata, "a RESULTS frame")
    outcomes: list[Outcome] = []
    for result in up.results:
        if len(result.logits) > MAX_LOGITS:
            raise WireError(f"a result with {len(result.logits)} logits; the limit is {MAX_LOGITS}", code="bad_message")
        outcomes.append(RowResult(result.request_id, result.exit, result.prediction, result.confidence,
                                  list(result.logits), result.node[:MAX_TEXT],
                                  [*read_trace(result.trace), stamp(receiver, "received")]))
    outcomes += [RowError(request_id, error.code[:MAX_TEXT], error.message[:1024], error.node[:MAX_TEXT])
                 for error in up.errors for request_id in error.request_ids]
    return outcomes
