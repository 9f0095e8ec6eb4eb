"""Messages down a stream: a batch past the message limit travels in chunks and is assembled back unchanged."""

from __future__ import annotations

import pytest
import torch

from splitexit.config.codec_names import parse_codec
from splitexit.errors import WireError
from splitexit.tensors import TensorInfo
from splitexit.wire.messages import (
    HEADER_ROOM,
    BatchAssembler,
    batch_messages,
    batch_trace,
    decode_batch,
    encode_tensors,
    hello_message,
    read_hello,
)

INFO = (TensorInfo(name="x", dtype=torch.float32, shape=(64,)),)
TRACE = [("edge", "sent", 12.5)]


def _assembler() -> BatchAssembler:
    def expect(version: int) -> tuple[TensorInfo, ...]:
        if version != 3:
            raise WireError(f"plan {version} is not served here", code="unknown_plan")
        return INFO

    return BatchAssembler(expect)


@pytest.mark.parametrize("limit", [HEADER_ROOM + 10_000_000, HEADER_ROOM + 1000])
def test_a_batch_is_assembled_back_from_what_was_sent(limit: int) -> None:
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    messages = batch_messages(3, list(range(100, 140)), encode_tensors((x,), parse_codec("raw")), TRACE, limit)
    assert (len(messages) == 1) == (limit > HEADER_ROOM + x.numel() * 4), "chunks only past the limit"
    assembler = _assembler()
    done = [batch for batch in map(assembler.add, messages) if batch is not None]
    assert len(done) == 1 and list(done[0].request_ids) == list(range(100, 140))
    assert batch_trace(done[0]) == TRACE
    (decoded,) = decode_batch(done[0], INFO)
    assert torch.equal(decoded, x)


def test_a_batch_of_a_plan_not_served_is_refused() -> None:
    messages = batch_messages(9, [1], encode_tensors((torch.zeros(1, 64),), parse_codec("raw")), [], 1 << 20)
    with pytest.raises(WireError) as caught:
        _assembler().add(messages[0])
    assert caught.value.code == "unknown_plan"


def test_a_stream_opens_with_a_hello_naming_its_sender() -> None:
    assert read_hello(hello_message("edge", 3).SerializeToString()) == "edge"
    batch = batch_messages(3, [1], [], [], 1 << 20)[0]
    assert read_hello(batch.SerializeToString()) is None
    assert read_hello(b"\xff\xff not protobuf") is None
