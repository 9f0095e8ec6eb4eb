"""BATCH frames: what the sender builds is read back unchanged, and every envelope check refuses what it must."""

from __future__ import annotations

import pytest
import torch

from splitexit.config.codec_names import parse_codec
from splitexit.errors import WireError
from splitexit.tensors import TensorInfo
from splitexit.wire import wire_pb2
from splitexit.wire.data_messages import (
    MAX_STAMPS,
    batch_frame,
    decode_batch,
    encode_tensors,
    read_batch,
)

INFO = (TensorInfo(name="x", dtype=torch.float32, shape=(64,)),)
TRACE = [("edge", "sent", 12.5)]


def expect(version: int) -> tuple[TensorInfo, ...]:
    if version != 3:
        raise WireError(f"plan {version} is not served here", code="unknown_plan")
    return INFO


def received(metadata: bytes, parts: list) -> memoryview:
    """The payload as the receiver has it: one buffer of its own."""
    return memoryview(bytearray(b"".join(bytes(p) for p in parts)))


@pytest.mark.parametrize("codec", ["raw", "fp16+lz4", "int8+zstd"])
def test_a_batch_is_read_back_from_what_was_sent(codec: str) -> None:
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    metadata, parts = batch_frame(3, list(range(100, 140)), encode_tensors((x,), parse_codec(codec)), TRACE)
    batch = read_batch(metadata, received(metadata, parts), max_rows=64, expect=expect)
    assert batch.plan_version == 3 and batch.request_ids == list(range(100, 140)) and batch.trace == TRACE
    (y,) = decode_batch(batch, INFO)
    assert y.shape == x.shape and torch.allclose(y, x, atol=0.05 if "int8" in codec else 1e-2)
    if codec == "raw":
        assert torch.equal(y, x)


def test_an_uncompressed_batch_is_sent_from_the_tensors_own_memory() -> None:
    x = torch.randn(4, 64)
    _, (part,) = batch_frame(3, [1, 2, 3, 4], encode_tensors((x,), parse_codec("raw")), TRACE)
    assert isinstance(part, memoryview) and part.nbytes == x.numel() * 4
    x[0, 0] = 123.0  # the part is a view: it sees the change
    assert torch.frombuffer(bytearray(part), dtype=torch.float32)[0] == 123.0


def _frame(ids: list[int], version: int = 3, rows: int | None = None, tensors: int = 1,
           trace: list | None = None) -> tuple[bytes, memoryview]:
    x = torch.randn(rows if rows is not None else len(ids), 64)
    metadata, parts = batch_frame(version, ids, encode_tensors((x,) * tensors, parse_codec("raw")), trace or TRACE)
    return metadata, received(metadata, parts)


@pytest.mark.parametrize("case, code", [
    ("no_rows", "bad_message"), ("too_many_rows", "bad_message"), ("repeated_ids", "bad_message"),
    ("unknown_plan", "unknown_plan"), ("two_tensors", "invalid_tensor"), ("short_payload", "bad_message"),
    ("long_trace", "bad_message"), ("garbage", "bad_message"),
])
def test_a_bad_envelope_is_refused_with_its_code(case: str, code: str) -> None:
    if case == "no_rows":
        metadata, payload = _frame([], rows=1)
    elif case == "too_many_rows":
        metadata, payload = _frame(list(range(9)))
    elif case == "repeated_ids":
        metadata, payload = _frame([5, 5])
    elif case == "unknown_plan":
        metadata, payload = _frame([1], version=4)
    elif case == "two_tensors":
        metadata, payload = _frame([1], tensors=2)
    elif case == "short_payload":
        metadata, payload = _frame([1])
        payload = payload[:-1]
    elif case == "long_trace":
        header = wire_pb2.BatchHeader.FromString(_frame([1])[0])
        header.trace.extend([wire_pb2.Stamp(node="n", event="e")] * (MAX_STAMPS + 1))
        metadata, payload = header.SerializeToString(), _frame([1])[1]
    else:
        metadata, payload = b"\xff\xff not protobuf", memoryview(b"")
    with pytest.raises(WireError) as caught:
        read_batch(metadata, payload, max_rows=8, expect=expect)
    assert caught.value.code == code, caught.value


def test_our_own_trace_is_cut_to_its_last_steps() -> None:
    metadata, payload = _frame([1], trace=[("n", "e", float(i)) for i in range(200)])
    batch = read_batch(metadata, payload, max_rows=8, expect=expect)
    assert len(batch.trace) == MAX_STAMPS and batch.trace[-1] == ("n", "e", 199.0)


def test_rows_must_match_the_request_ids() -> None:
    metadata, payload = _frame([1, 2], rows=3)
    batch = read_batch(metadata, payload, max_rows=8, expect=expect)
    with pytest.raises(WireError, match="3 rows for 2 request ids"):
        decode_batch(batch, INFO)
