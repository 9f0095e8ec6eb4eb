"""The frame reader: any split of the byte stream gives the frames that were written; bad headers are refused
before anything they declare is allocated."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitexit.errors import WireError
from splitexit.wire.framing import HEADER, MAGIC, Frame, FrameLimits, FrameReader, FrameType, frame_header

LIMITS = FrameLimits(metadata=1024, payload=1 << 20)
STAGING = 4096  # small, so that payloads past it take the large-payload path


def encode(kind: FrameType, metadata: bytes, payload: bytes, batch_id: int = 0, deadline: float = 0.0) -> bytes:
    return frame_header(kind, batch_id=batch_id, deadline=deadline, metadata_size=len(metadata),
                        payload_size=len(payload)) + metadata + payload


def feed(reader: FrameReader, data: bytes, cuts: list[int]) -> list[Frame]:
    """Write ``data`` into the reader in pieces ending at ``cuts``, each as large as buffer() allows."""
    frames: list[Frame] = []
    position = 0
    for end in [*sorted(set(cuts)), len(data)]:
        while position < end:
            target = reader.buffer()
            assert len(target) > 0
            count = min(len(target), end - position)
            target[:count] = data[position:position + count]
            position += count
            frames += reader.filled(count)
    return frames


frames_strategy = st.lists(st.tuples(st.sampled_from([FrameType.BATCH, FrameType.RESULTS, FrameType.CREDIT]),
                                     st.binary(max_size=300), st.integers(0, 20_000), st.integers(0, 2**64 - 1)),
                           min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(frames_strategy, st.data())
def test_any_split_of_the_stream_gives_back_the_frames(written: list, data: st.DataObject) -> None:
    stream, expected = b"", []
    for kind, metadata, size, batch_id in written:
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256) if kind is FrameType.BATCH else b""
        stream += encode(kind, metadata, payload, batch_id, deadline=1.5)
        expected.append((kind, metadata, payload, batch_id))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    got = feed(FrameReader(LIMITS, staging=STAGING), stream, cuts)
    assert [(f.kind, f.metadata, bytes(f.payload), f.batch_id) for f in got] == expected
    assert all(f.deadline == 1.5 for f in got)


def test_a_large_payload_lands_in_a_buffer_of_its_own_that_later_frames_do_not_touch() -> None:
    reader = FrameReader(LIMITS, staging=STAGING)
    first, second = b"\x01" * 100_000, b"\x02" * 50_000
    frames = feed(reader, encode(FrameType.BATCH, b"m1", first) + encode(FrameType.BATCH, b"m2", second), [])
    assert [bytes(f.payload) for f in frames] == [first, second]
    assert frames[0].payload.obj is not frames[1].payload.obj


def test_the_owner_allocates_the_buffers_large_payloads_are_read_into() -> None:
    """What a GPU node hands in to read payloads into page-locked memory: asked only for large payloads, with
    their exact size, and the frame's payload is that buffer."""
    made: list[memoryview] = []

    def payload_buffer(size: int) -> memoryview:
        made.append(memoryview(bytearray(size)))
        return made[-1]

    reader = FrameReader(LIMITS, staging=STAGING, payload_buffer=payload_buffer)
    small, large = b"\x03" * 100, b"\x04" * 100_000
    frames = feed(reader, encode(FrameType.BATCH, b"m", small) + encode(FrameType.BATCH, b"m", large), [])
    assert [bytes(f.payload) for f in frames] == [small, large]
    assert [len(m) for m in made] == [len(large)]
    assert frames[1].payload is made[0]


@pytest.mark.parametrize("header, says", [
    (b"HTTP" + frame_header(FrameType.BATCH)[4:], "not a splitexit frame"),
    (frame_header(FrameType.BATCH)[:4] + b"\x09" + frame_header(FrameType.BATCH)[5:], "version 9"),
    (HEADER.pack(MAGIC, 1, 99, 0, 0, 0.0, 0, 0), "unknown frame type 99"),
    (frame_header(FrameType.BATCH, metadata_size=1025), "metadata"),
    (frame_header(FrameType.BATCH, payload_size=(1 << 20) + 1), "payload"),
    (frame_header(FrameType.BATCH, payload_size=2**64 - 1), "payload"),
    (frame_header(FrameType.RESULTS, payload_size=8), "carries no payload"),
    (frame_header(FrameType.BATCH, deadline=math.nan), "deadline"),
    (frame_header(FrameType.BATCH, deadline=-1.0), "deadline"),
])
def test_a_bad_header_is_refused_before_anything_is_allocated(header: bytes, says: str) -> None:
    reader = FrameReader(LIMITS, staging=STAGING)
    with pytest.raises(WireError, match=says):
        feed(reader, header, [])
    assert reader._big is None


def test_the_staging_buffer_must_hold_a_header_and_the_largest_metadata() -> None:
    with pytest.raises(ValueError, match="staging"):
        FrameReader(FrameLimits(metadata=10_000), staging=4096)
