"""What comes back up a stream: each row's :class:`~splitexit.runtime.hop.RowResult` or
:class:`~splitexit.runtime.hop.RowError` as an ``Up`` message, and back.

The node encodes, the stream client (:mod:`~splitexit.runtime.remote`) decodes; both go through here, so
the two ends cannot drift. (What goes *down* a stream is in :mod:`splitexit.wire.messages`: it carries
tensors and request ids only, no runtime types.)
"""

from __future__ import annotations

from splitexit.errors import WireError
from splitexit.runtime.hop import Outcome, RowError, RowResult, stamp
from splitexit.wire import wire_pb2

__all__ = ["decode_up", "encode_outcome", "encode_rejection"]


def encode_outcome(outcome: Outcome) -> wire_pb2.Up:
    """One row's answer (from this node or relayed from further down)."""
    if isinstance(outcome, RowResult):
        return wire_pb2.Up(results=[wire_pb2.Result(
            request_id=outcome.request_id, exit=outcome.exit, prediction=outcome.prediction,
            confidence=outcome.confidence, logits=outcome.logits, node=outcome.node,
            trace=[wire_pb2.Stamp(node=n, event=e, time=t) for n, e, t in outcome.trace])])
    return wire_pb2.Up(errors=[wire_pb2.RequestError(request_ids=[outcome.request_id], code=outcome.code,
                                                    message=outcome.message, node=outcome.node)])


def encode_rejection(ids: list[int], error: WireError, node: str) -> wire_pb2.Up:
    """``node`` refused the rows ``ids`` (all of one batch; none when the message named no rows)."""
    return wire_pb2.Up(errors=[wire_pb2.RequestError(request_ids=ids, code=error.code, message=str(error),
                                                    node=node)])


def decode_up(up: wire_pb2.Up, receiver: str) -> list[Outcome]:
    """Every row an ``Up`` message answers; results get a ``received`` stamp of ``receiver``."""
    outcomes: list[Outcome] = [
        RowResult(result.request_id, result.exit, result.prediction, result.confidence, list(result.logits),
                  result.node, [*((s.node, s.event, s.time) for s in result.trace), stamp(receiver, "received")])
        for result in up.results]
    outcomes += [RowError(request_id, error.code, error.message, error.node)
                 for error in up.errors for request_id in error.request_ids]
    return outcomes
