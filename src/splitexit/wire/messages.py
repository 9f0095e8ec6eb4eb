"""Messages down a stream: gRPC options, the Hello and the batches (chunked past the message limit), and
checking and assembling incoming batches.

Nothing from the network is used before it is checked here: the plan version (one the node serves), the
row count, the number of tensors, chunk order and counts, and (through the codec) each tensor's dtype,
shape and size against what this stage expects. Failures are :class:`~splitexit.errors.WireError` with a
code the peer gets back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from splitexit.config.codec_names import CodecSpec
from splitexit.errors import WireError
from splitexit.tensors import TensorInfo
from splitexit.wire import wire_pb2
from splitexit.wire.tensor_codec import decode, encode, raw_size

__all__ = [
    "HEADER_ROOM",
    "MAX_ROWS",
    "BatchAssembler",
    "batch_messages",
    "batch_trace",
    "decode_batch",
    "encode_tensors",
    "grpc_options",
    "hello_message",
    "raw_size",
    "read_hello",
]

#: (node, event, wall-clock seconds): one step of a request's trace, as batches carry it.
TraceStep = tuple[str, str, float]

#: Most rows one batch message may carry.
MAX_ROWS = 4096
#: Most chunks one tensor may be split into.
MAX_CHUNKS = 4096
#: Room left in a message for everything but tensor data.
HEADER_ROOM = 64 * 1024

#: gRPC's reconnect back-off grows to 120 s by default: a channel that saw its peer go away would fail calls
#: fast for that long after the peer came back (a restarted node, a restarted etcd). Ours retries within a
#: second; callers keep their own, longer back-off on top.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
#: Every channel pings its peer after this many ms without traffic and gives the connection up when no
#: answer comes within the timeout: a peer that froze (SIGSTOP, a dead host) breaks its streams, so their
#: rows are resubmitted, instead of holding them until TCP notices.
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 10_000, 5_000
CLIENT_KEEPALIVE = [("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
#: A server accepts those pings (by default gRPC servers refuse pings more often than every 5 minutes).
SERVER_KEEPALIVE = [("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
                    ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS)]
#: A node's port is its own: without this, gRPC sets SO_REUSEPORT and a second node on a used port starts,
#: says it is ready, and silently shares the port with the first.
SERVER_OWN_PORT = [("grpc.so_reuseport", 0)]


def grpc_options(message_limit: int) -> list[tuple[str, int]]:
    """Explicit message limits (gRPC's 4 MiB default would refuse large activations silently)."""
    return [("grpc.max_send_message_length", message_limit), ("grpc.max_receive_message_length", message_limit)]


def hello_message(sender: str, plan_version: int) -> wire_pb2.Down:
    """The first message of every stream: who sends (the name in its certificate, with TLS)."""
    return wire_pb2.Down(hello=wire_pb2.Hello(sender=sender, plan_version=plan_version))


def read_hello(raw: bytes) -> str | None:
    """The sender a stream's first message names, or None if it is not a Hello."""
    try:
        down = wire_pb2.Down.FromString(raw)
    except DecodeError:
        return None
    return down.hello.sender if down.WhichOneof("body") == "hello" else None


def batch_messages(plan_version: int, ids: Sequence[int], tensors: Sequence[wire_pb2.Tensor],
                   trace: Sequence[TraceStep], message_limit: int) -> list[wire_pb2.Down]:
    """One batch message, or a header batch plus chunks when the tensors exceed the message limit."""
    # Filled in place: protobuf constructors copy their arguments field by field, which is far slower
    # than CopyFrom for a large tensor.
    down = wire_pb2.Down()
    batch = down.batch
    batch.plan_version = plan_version
    batch.request_ids.extend(ids)
    for tensor in tensors:
        batch.tensors.add().CopyFrom(tensor)
    for node, event, t in trace:
        batch.trace.add(node=node, event=event, time=t)
    chunk_size = message_limit - HEADER_ROOM
    if down.ByteSize() <= chunk_size:
        return [down]
    chunks: list[wire_pb2.Down] = []
    for index, tensor in enumerate(batch.tensors):
        data = tensor.data
        pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
        tensor.data = b""
        tensor.chunks = len(pieces)
        for i, piece in enumerate(pieces):
            chunk = wire_pb2.Down()
            chunk.chunk.batch_key, chunk.chunk.tensor_index = ids[0], index
            chunk.chunk.index, chunk.chunk.count, chunk.chunk.data = i, len(pieces), piece
            chunks.append(chunk)
    return [down, *chunks]


def batch_trace(batch: wire_pb2.Batch) -> list[TraceStep]:
    """The trace a batch carries, as (node, event, time) steps."""
    return [(s.node, s.event, s.time) for s in batch.trace]


def encode_tensors(tensors: tuple[torch.Tensor, ...], codec: CodecSpec) -> list[wire_pb2.Tensor]:
    return [encode(t.contiguous(), codec) for t in tensors]


def decode_batch(batch: wire_pb2.Batch, expected: tuple[TensorInfo, ...]) -> tuple[torch.Tensor, ...]:
    """Decode every tensor of a validated batch, checking dtype and per-sample shape against the stage."""
    rows = len(batch.request_ids)
    tensors = []
    for message, info in zip(batch.tensors, expected):
        if len(message.shape) == 0 or message.shape[0] != rows:
            raise WireError(f"tensor {info.name} has {message.shape[0] if message.shape else 'no'} rows for "
                            f"{rows} request ids", code="invalid_tensor")
        tensors.append(decode(message, max_bytes=rows * info.bytes_per_sample,
                              expected=(info.dtype, tuple(info.shape))))
    return tuple(tensors)


@dataclass
class _Open:
    batch: wire_pb2.Batch
    parts: list[list[bytes]]
    max_size: int
    size: int = 0


class BatchAssembler:
    """Checks each incoming batch's envelope and glues chunked tensors back together, one stream at a time.

    ``add(down)`` returns a complete batch, ``None`` while chunks are still due, or raises WireError (the
    batch it concerns is then dropped; the stream stays usable).
    """

    def __init__(self, expect: Callable[[int], tuple[TensorInfo, ...]]):
        """``expect(plan_version)`` gives the tensors a batch of that plan must carry, or raises WireError."""
        self.expect = expect
        self._open: _Open | None = None

    def add(self, down: wire_pb2.Down) -> wire_pb2.Batch | None:
        kind = down.WhichOneof("body")
        if kind == "batch":
            if self._open is not None:
                dropped, self._open = self._open, None
                raise WireError(f"a new batch arrived before the chunks of batch {dropped.batch.request_ids[0]} "
                                "were complete", code="bad_message")
            return self._start(down.batch)
        if kind == "chunk":
            return self._chunk(down.chunk)
        raise WireError(f"unexpected message {kind!r} in the middle of a stream", code="bad_message")

    def _start(self, batch: wire_pb2.Batch) -> wire_pb2.Batch | None:
        rows = len(batch.request_ids)
        expected = self.expect(batch.plan_version)
        if not 0 < rows <= MAX_ROWS:
            raise WireError(f"a batch must carry 1 to {MAX_ROWS} request ids, got {rows}", code="bad_message")
        if len(set(batch.request_ids)) != rows:
            raise WireError("request ids within a batch must be distinct", code="bad_message")
        if len(batch.tensors) != len(expected):
            raise WireError(f"this stage takes {len(expected)} tensors, the batch has {len(batch.tensors)}",
                            code="invalid_tensor")
        chunked = [t.chunks for t in batch.tensors]
        if not any(chunked):
            return batch
        if any(c > MAX_CHUNKS for c in chunked) or any(c and t.data for c, t in zip(chunked, batch.tensors)):
            raise WireError(f"chunked tensors need 1 to {MAX_CHUNKS} chunks and no inline data", code="bad_message")
        self._open = _Open(batch, [[] for _ in batch.tensors],
                           max_size=rows * sum(t.bytes_per_sample for t in expected))
        return None

    def _chunk(self, chunk: wire_pb2.Chunk) -> wire_pb2.Batch | None:
        current = self._open
        if current is None:
            raise WireError("a chunk arrived without its batch", code="bad_message")
        key = current.batch.request_ids[0]
        tensors = current.batch.tensors
        index = chunk.tensor_index
        if chunk.batch_key != key or index >= len(tensors) or chunk.count != tensors[index].chunks \
                or chunk.index != len(current.parts[index]):
            self._open = None
            raise WireError(f"chunk {chunk.index}/{chunk.count} of tensor {index} does not follow batch {key} in "
                            "order", code="bad_message")
        current.size += len(chunk.data)
        if current.size > current.max_size:
            self._open = None
            raise WireError(f"chunked batch {key} exceeds its size limit", code="too_large")
        current.parts[index].append(chunk.data)
        if any(len(parts) < tensor.chunks for parts, tensor in zip(current.parts, tensors) if tensor.chunks):
            return None
        for parts, tensor in zip(current.parts, tensors):
            if tensor.chunks:
                tensor.data = b"".join(parts)
                tensor.chunks = 0
        self._open = None
        return current.batch
