"""The metadata blocks of data-plane frames (``docs/wire.md``), to bytes and back, every one checked.

A BATCH frame's metadata is a ``BatchHeader`` (plan, request ids, tensor headers, trace) and its payload
the tensors' bytes back to back; HELLO, WELCOME, CREDIT and GOODBYE carry one small message each. Nothing
from the network is used before :func:`read_batch` (or the reader of its type) has checked it: the row
count against the node's ``max_rows``, distinct ids, the tensor count against the stage, each tensor's
payload size against the frame's, and the trace's length and strings. Failures are
:class:`~splitexit.errors.WireError` with a code the peer gets back. (What travels *up*, results and
per-request errors, is in :mod:`splitexit.runtime.stream_messages`: it needs the runtime's types.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from splitexit.config.codec_names import CodecSpec
from splitexit.errors import WireError
from splitexit.tensors import TensorInfo
from splitexit.wire import wire_pb2
from splitexit.wire.compression import Payload
from splitexit.wire.tensor_codec import EncodedTensor, decode, encode

__all__ = [
    "MAX_STAMPS",
    "MAX_TEXT",
    "IncomingBatch",
    "TraceStep",
    "batch_frame",
    "decode_batch",
    "encode_tensors",
    "parse",
    "read_batch",
    "read_trace",
]

#: (node, event, wall-clock seconds): one step of a request's trace, as batches carry it.
TraceStep = tuple[str, str, float]

#: Most trace steps a batch (or a result) may carry: a chain of a few tiers stamps about six per node.
MAX_STAMPS = 64
#: Longest node or event name in a trace (node names are at most 64 characters).
MAX_TEXT = 64

M = TypeVar("M", bound=Message)


def parse(kind: type[M], data: bytes, what: str) -> M:
    """A protobuf message from a frame's metadata, or WireError ``bad_message``."""
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise WireError(f"{what} is not a valid {kind.__name__} ({len(data)} bytes): {exc}",
                        code="bad_message") from None


def encode_tensors(tensors: tuple[torch.Tensor, ...], codec: CodecSpec) -> list[EncodedTensor]:
    """The tensors a stage forwards, ready for a BATCH frame."""
    return [encode(t.contiguous(), codec) for t in tensors]


def batch_frame(plan_version: int, ids: Sequence[int], tensors: Sequence[EncodedTensor],
                trace: Sequence[TraceStep]) -> tuple[bytes, list[Payload]]:
    """A BATCH frame's metadata and payload parts (the tensors' own buffers, in order)."""
    header = wire_pb2.BatchHeader(plan_version=plan_version, request_ids=list(ids))
    for tensor in tensors:
        header.tensors.add().CopyFrom(tensor.header)
    for node, event, t in trace[-MAX_STAMPS:]:
        header.trace.add(node=node[:MAX_TEXT], event=event[:MAX_TEXT], time=t)
    return header.SerializeToString(), [t.payload for t in tensors]


@dataclass(frozen=True)
class IncomingBatch:
    """A batch whose envelope was checked: its tensors are still bytes, decoded by :func:`decode_batch`."""

    plan_version: int
    request_ids: list[int]
    tensors: list[tuple[wire_pb2.Tensor, memoryview]]
    trace: list[TraceStep]


def read_batch(metadata: bytes, payload: memoryview, *, max_rows: int,
               expect: Callable[[int], tuple[TensorInfo, ...]]) -> IncomingBatch:
    """Check a BATCH frame's envelope. ``expect(plan_version)`` gives the tensors that plan's stage takes
    (or raises WireError ``unknown_plan``)."""
    header = parse(wire_pb2.BatchHeader, metadata, "a batch header")
    ids = list(header.request_ids)
    if not 0 < len(ids) <= max_rows:
        raise WireError(f"a batch must carry 1 to {max_rows} request ids, got {len(ids)}", code="bad_message")
    if len(set(ids)) != len(ids):
        raise WireError("request ids within a batch must be distinct", code="bad_message")
    expected = expect(header.plan_version)
    if len(header.tensors) != len(expected):
        raise WireError(f"this stage takes {len(expected)} tensors, the batch has {len(header.tensors)}",
                        code="invalid_tensor")
    declared = sum(t.payload_size for t in header.tensors)
    if declared != payload.nbytes:
        raise WireError(f"the tensor headers declare {declared} payload bytes, the frame carries {payload.nbytes}",
                        code="bad_message")
    tensors, at = [], 0
    for tensor in header.tensors:
        tensors.append((tensor, payload[at:at + tensor.payload_size]))
        at += tensor.payload_size
    return IncomingBatch(header.plan_version, ids, tensors, read_trace(header.trace))


def read_trace(stamps: Sequence[wire_pb2.Stamp]) -> list[TraceStep]:
    """A peer's trace, checked: at most MAX_STAMPS steps, short names, finite times."""
    if len(stamps) > MAX_STAMPS:
        raise WireError(f"a trace of {len(stamps)} steps; the limit is {MAX_STAMPS}", code="bad_message")
    steps = []
    for s in stamps:
        if len(s.node) > MAX_TEXT or len(s.event) > MAX_TEXT or not math.isfinite(s.time):
            raise WireError(f"a trace step must name a node and an event of at most {MAX_TEXT} characters at a "
                            "finite time", code="bad_message")
        steps.append((s.node, s.event, s.time))
    return steps


def decode_batch(batch: IncomingBatch, expected: tuple[TensorInfo, ...]) -> tuple[torch.Tensor, ...]:
    """Decode every tensor of a checked batch, checking dtype and per-sample shape against the stage."""
    rows = len(batch.request_ids)
    tensors = []
    for (header, data), info in zip(batch.tensors, expected):
        if len(header.shape) == 0 or header.shape[0] != rows:
            raise WireError(f"tensor {info.name} has {header.shape[0] if header.shape else 'no'} rows for "
                            f"{rows} request ids", code="invalid_tensor")
        tensors.append(decode(header, data, max_bytes=rows * info.bytes_per_sample,
                              expected=(info.dtype, tuple(info.shape))))
    return tuple(tensors)
