"""Frames of the data plane: a fixed header, a small metadata block, then raw payload bytes.

A frame is ``HEADER`` (36 bytes, network byte order: magic, version, type, flags, batch id, deadline,
metadata size, payload size), then ``metadata_size`` bytes of metadata (a protobuf message, validated by
the caller), then ``payload_size`` bytes of payload (tensor bytes, never copied into protobuf). The format
is ours to keep stable: ``docs/wire.md``.

:class:`FrameReader` is the receiving side's state machine, shaped for :class:`asyncio.BufferedProtocol`:
the transport reads straight into the buffer ``buffer()`` hands out, and a payload larger than the
staging buffer is read into a buffer of its own, allocated once its size is checked against the limits
(no reading into growing ``bytes``, no copy of large payloads; the owner may supply that allocation, e.g.
page-locked memory for a GPU). Sizes are checked before anything is
allocated; a frame that breaks a rule is a :class:`~splitexit.errors.WireError` and the connection is
closed by its owner (a stream of frames has no resynchronisation point).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from splitexit.errors import WireError

__all__ = ["HEADER", "MAGIC", "VERSION", "Frame", "FrameLimits", "FrameReader", "FrameType", "frame_header"]

MAGIC = b"SXF1"
VERSION = 1
#: magic, version, type, flags, batch id, deadline (seconds left, 0: none), metadata size, payload size
HEADER = struct.Struct("!4sBBHQdIQ")
#: Bytes of the staging buffer: headers, metadata and payloads up to this size are read through it.
STAGING = 256 * 1024


def _unfilled(size: int) -> memoryview:
    """``size`` bytes, not zero-filled (a bytearray would be): every byte is read into it before use."""
    return np.empty(size, np.uint8).data


class FrameType(IntEnum):
    """What a frame carries. Unknown types are refused: a peer must not make us guess."""

    HELLO = 1      # upstream -> downstream, first: who sends, the token, the plan
    WELCOME = 2    # downstream -> upstream: accepted, with the first credit grant
    BATCH = 3      # a batch of rows: metadata (ids, tensor headers, trace), payload (the tensors' bytes)
    RESULTS = 4    # answers and per-request errors (metadata only)
    CREDIT = 5     # the receiver grants more frames (metadata only)
    GOODBYE = 6    # orderly close, with a reason
    PING = 7       # upstream -> downstream while idle: the connection is alive (no metadata)


@dataclass
class FrameLimits:
    """What a receiver accepts: checked on each header before any metadata or payload is allocated. A node's
    data service shares one instance among its connections and sets ``payload`` from the stages it serves."""

    metadata: int = 192 * 1024
    payload: int = 64 * 1024 * 1024

    def check(self, kind: FrameType, metadata_size: int, payload_size: int) -> None:
        if metadata_size > self.metadata:
            raise WireError(f"{kind.name} frame declares {metadata_size} bytes of metadata; the limit is "
                            f"{self.metadata}", code="too_large")
        if payload_size > self.payload:
            raise WireError(f"{kind.name} frame declares a {payload_size}-byte payload; the limit is "
                            f"{self.payload}", code="too_large")
        if payload_size and kind is not FrameType.BATCH:
            raise WireError(f"a {kind.name} frame carries no payload, this one declares {payload_size} bytes")


@dataclass(frozen=True)
class Frame:
    """One received frame. ``payload`` is a buffer of its own (the reader never writes into it again)."""

    kind: FrameType
    flags: int
    batch_id: int
    deadline: float
    metadata: bytes
    payload: memoryview


def frame_header(kind: FrameType, *, batch_id: int = 0, deadline: float = 0.0, metadata_size: int = 0,
                 payload_size: int = 0, flags: int = 0) -> bytes:
    """The header that starts a frame; the sender writes metadata and payload after it (``writelines``)."""
    return HEADER.pack(MAGIC, VERSION, kind, flags, batch_id, deadline, metadata_size, payload_size)


class FrameReader:
    """Turns bytes read from a connection into :class:`Frame` s: ``buffer()`` to read into, then
    ``filled(n)`` with the count read, which returns the frames completed by those bytes. ``payload_buffer``
    allocates the buffer a payload larger than the staging buffer is read into (its size already checked)."""

    def __init__(self, limits: FrameLimits | None = None, staging: int = STAGING,
                 payload_buffer: Callable[[int], memoryview] | None = None):
        self.limits = limits = limits or FrameLimits()
        self._payload_buffer = payload_buffer or _unfilled
        if staging < HEADER.size + limits.metadata:
            raise ValueError("the staging buffer must hold a header and the largest metadata block")
        self._staging_size = staging
        # allocated on the first bytes: a connection that never sends (a silent attacker, one refused before
        # it speaks) holds no buffer, so thousands of them cost the node no memory
        self._staging = memoryview(bytearray(0))
        self._start = 0  # first unconsumed byte of the staging buffer
        self._end = 0    # one past the last byte read into it
        self._big: memoryview | None = None  # a large payload being read into its own buffer
        self._big_filled = 0
        self._pending: tuple[FrameType, int, int, float, bytes] | None = None  # the header + metadata of _big

    def buffer(self) -> memoryview:
        """Where the next bytes from the connection go (never empty)."""
        if self._big is not None:
            return self._big[self._big_filled:]
        if not self._staging:
            self._staging = memoryview(bytearray(self._staging_size))
        if self._end == len(self._staging):  # compact: move the unconsumed tail to the front
            tail = self._end - self._start
            self._staging[:tail] = self._staging[self._start:self._end]
            self._start, self._end = 0, tail
        return self._staging[self._end:]

    def filled(self, count: int) -> list[Frame]:
        """``count`` bytes were read into the last ``buffer()``; the frames they complete, in order."""
        if self._big is not None:
            self._big_filled += count
            if self._big_filled < len(self._big):
                return []
            return [self._finish_big(), *self._parse()]
        self._end += count
        return self._parse()

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        while True:
            available = self._end - self._start
            if available < HEADER.size:
                return frames
            kind, flags, batch_id, deadline, metadata_size, payload_size = self._header()
            needed = HEADER.size + metadata_size
            if needed + payload_size <= available:  # the whole frame is here: copy it out of the staging buffer
                at = self._start + HEADER.size
                metadata = bytes(self._staging[at:at + metadata_size])
                payload = memoryview(bytes(self._staging[at + metadata_size:at + metadata_size + payload_size]))
                self._start += needed + payload_size
                frames.append(Frame(kind, flags, batch_id, deadline, metadata, payload))
                continue
            if payload_size > len(self._staging) - needed and needed <= available:
                # a large payload: its own buffer, with the bytes of it already here copied to the front
                at = self._start + HEADER.size
                metadata = bytes(self._staging[at:at + metadata_size])
                here = available - needed
                self._big = self._payload_buffer(payload_size)
                self._big[:here] = self._staging[at + metadata_size:self._end]
                self._big_filled = here
                self._pending = (kind, flags, batch_id, deadline, metadata)
                self._start = self._end = 0
                return frames
            if self._start > 0 and self._start + needed + payload_size > len(self._staging):
                tail = available  # make room: the rest of this frame fits once the tail is at the front
                self._staging[:tail] = self._staging[self._start:self._end]
                self._start, self._end = 0, tail
            return frames

    def _header(self) -> tuple[FrameType, int, int, float, int, int]:
        magic, version, kind, flags, batch_id, deadline, metadata_size, payload_size = HEADER.unpack_from(
            self._staging, self._start)
        if magic != MAGIC:
            raise WireError(f"not a splitexit frame (magic {bytes(magic)!r}); is the peer speaking another "
                            "protocol, or an older splitexit?")
        if version != VERSION:
            raise WireError(f"frame version {version}; this node speaks version {VERSION}: upgrade the older side")
        try:
            frame_type = FrameType(kind)
        except ValueError:
            raise WireError(f"unknown frame type {kind}") from None
        if not deadline >= 0 or deadline == float("inf"):  # also refuses NaN
            raise WireError(f"frame deadline {deadline!r} is not a number of seconds")
        self.limits.check(frame_type, metadata_size, payload_size)
        return frame_type, flags, batch_id, deadline, metadata_size, payload_size

    def _finish_big(self) -> Frame:
        assert self._big is not None and self._pending is not None
        kind, flags, batch_id, deadline, metadata = self._pending
        frame = Frame(kind, flags, batch_id, deadline, metadata, self._big)
        self._big, self._big_filled, self._pending = None, 0, None
        return frame
