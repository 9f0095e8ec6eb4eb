"""Compressing a tensor's payload, and decompressing a peer's without letting it choose how much memory we use.

Decompression is bounded by the size the message's header declares (checked against the node's limit
before anything is allocated): a payload that would inflate past it is refused as ``too_large`` after at
most one byte too many, and every lz4 or zstd failure becomes a :class:`~splitexit.errors.WireError`.
"""

from __future__ import annotations

import lz4.frame
import numpy as np
import zstandard

from splitexit.errors import WireError

__all__ = ["MIN_ZSTD_WINDOW", "ZSTD_LEVEL", "Payload", "compress", "decompress"]

#: zstd level: on activations 1 is much faster than the default 3 for a few percent more bytes.
ZSTD_LEVEL = 1
#: The zstd window a peer may make us allocate, at least (frames of our own never need more than their size).
MIN_ZSTD_WINDOW = 1 << 20


#: Bytes a payload is held in: our own buffers, or a view of a received frame.
Payload = bytes | bytearray | memoryview


def compress(payload: np.ndarray, compression: str) -> Payload:
    """``payload`` (flat uint8) compressed with ``compression`` (``none``, ``lz4`` or ``zstd``); with ``none``
    a view of the array's own memory (the frame is sent from it, never copied)."""
    if compression == "lz4":
        return lz4.frame.compress(payload)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload.data)
    return memoryview(payload.data).cast("B")


def _invalid(text: str) -> WireError:
    return WireError(f"invalid tensor on the wire: {text}", code="invalid_tensor")


def decompress(data: Payload, compression: str, size: int) -> Payload:
    """The encoded payload, exactly ``size`` bytes; never produces (or allocates for) more than ``size + 1``."""
    if compression == "none":
        if memoryview(data).nbytes != size:
            raise _invalid(f"payload has {memoryview(data).nbytes} bytes, the header declares {size}")
        return data
    try:
        if compression == "lz4":
            return _lz4_bounded(data, size)
        return _zstd_bounded(data, size)
    except (RuntimeError, zstandard.ZstdError, ValueError, OSError) as exc:
        raise _invalid(f"{compression} payload is corrupt: {exc}") from exc


def _overflow(compression: str, size: int) -> WireError:
    return WireError(f"{compression} payload decompresses past its declared {size} bytes (a corrupt or "
                     "hostile message)", code="too_large")


def _short(compression: str, got: int, size: int) -> WireError:
    return _invalid(f"{compression} payload decompresses to {got} bytes, the header declares {size}")


def _lz4_bounded(data: Payload, size: int) -> bytes:
    decompressor = lz4.frame.LZ4FrameDecompressor()
    out = decompressor.decompress(data, max_length=size + 1)
    if len(out) > size:
        raise _overflow("lz4", size)
    if not decompressor.eof:
        raise _invalid("lz4 payload is truncated (no end of frame)")
    if decompressor.unused_data:
        raise _invalid(f"{len(decompressor.unused_data)} bytes of trailing data after the lz4 frame")
    if len(out) != size:
        raise _short("lz4", len(out), size)
    return out


def _zstd_bounded(data: Payload, size: int) -> bytearray:
    declared = zstandard.frame_content_size(data)
    if declared > size:
        raise WireError(f"zstd frame declares {declared} bytes, the header {size} (a corrupt or hostile message)",
                        code="too_large")
    # The window caps zstd's own buffers; frames we write never need more than their content size.
    window = max(MIN_ZSTD_WINDOW, size)
    reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(data, read_across_frames=True)
    out = bytearray(size)  # size was checked against the limit: the only allocation the peer sized
    view = memoryview(out)
    filled = 0
    while filled < size:
        count = reader.readinto(view[filled:])
        if not count:
            raise _short("zstd", filled, size)
        filled += count
    if reader.read(1):
        raise _overflow("zstd", size)
    return out
