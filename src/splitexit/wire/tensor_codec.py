"""Tensors to and from the wire: the only place that turns a ``torch.Tensor`` into bytes and back.

A tensor on the wire is a header (a protobuf ``Tensor``: dtype, shape, encoding, compression, sizes) and
its payload bytes, which travel raw in a frame (``docs/wire.md``), never inside protobuf. Pure
functions, no I/O, keyed by the protobuf enums; what each codec name means, and how close each lossy
encoding comes, is in :mod:`~splitexit.wire.codec_names`.

:func:`decode` treats every header and payload as hostile: it validates the header before allocating
anything whose size the peer chose, caps decompression at the declared size (:mod:`~splitexit.wire.compression`),
and turns every failure into a :class:`~splitexit.errors.WireError` (never a numpy, lz4 or zstd exception).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from splitexit.config.codec_names import CodecSpec
from splitexit.errors import WireError
from splitexit.wire import wire_pb2
from splitexit.wire.compression import Payload, compress, decompress

__all__ = ["MAX_RANK", "EncodedTensor", "decode", "encode", "raw_size", "wraps_payload"]

#: Largest tensor rank accepted from the wire.
MAX_RANK = 8
#: Axis the per-channel int8 scales run along (NCHW channels, or the feature axis of (N, D) tensors).
CHANNEL_AXIS = 1

_ENCODING_TO_WIRE = {
    "raw": wire_pb2.ENCODING_RAW,
    "fp16": wire_pb2.ENCODING_FP16,
    "bf16": wire_pb2.ENCODING_BF16,
    "int8": wire_pb2.ENCODING_INT8,
}
_COMPRESSION_TO_WIRE = {
    "none": wire_pb2.COMPRESSION_NONE,
    "lz4": wire_pb2.COMPRESSION_LZ4,
    "zstd": wire_pb2.COMPRESSION_ZSTD,
}
_WIRE_TO_ENCODING = {v: k for k, v in _ENCODING_TO_WIRE.items()}
_WIRE_TO_COMPRESSION = {v: k for k, v in _COMPRESSION_TO_WIRE.items()}
#: Bytes per element of each lossy encoding (raw uses the dtype's own size).
_ENCODING_ITEMSIZE = {"fp16": 2, "bf16": 2, "int8": 1}


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor ready to send: its header, and its payload (``header.payload_size`` bytes)."""

    header: wire_pb2.Tensor
    payload: Payload

    @property
    def size(self) -> int:
        """Bytes on the wire: the payload (the header travels in the frame's metadata)."""
        return int(self.header.payload_size)


@dataclass(frozen=True)
class _WireDType:
    torch: torch.dtype
    numpy: np.dtype  # little-endian storage dtype (bfloat16 as uint16, bool as uint8)


_DTYPES = {
    wire_pb2.DTYPE_FLOAT32: _WireDType(torch.float32, np.dtype("<f4")),
    wire_pb2.DTYPE_FLOAT16: _WireDType(torch.float16, np.dtype("<f2")),
    wire_pb2.DTYPE_BFLOAT16: _WireDType(torch.bfloat16, np.dtype("<u2")),
    wire_pb2.DTYPE_FLOAT64: _WireDType(torch.float64, np.dtype("<f8")),
    wire_pb2.DTYPE_INT64: _WireDType(torch.int64, np.dtype("<i8")),
    wire_pb2.DTYPE_INT32: _WireDType(torch.int32, np.dtype("<i4")),
    wire_pb2.DTYPE_INT8: _WireDType(torch.int8, np.dtype("i1")),
    wire_pb2.DTYPE_UINT8: _WireDType(torch.uint8, np.dtype("u1")),
    wire_pb2.DTYPE_BOOL: _WireDType(torch.bool, np.dtype("u1")),
}
_TORCH_TO_WIRE = {d.torch: k for k, d in _DTYPES.items()}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_BIG_ENDIAN = sys.byteorder == "big"
#: Bound on the product of a shape's non-zero dims: torch computes strides from it, even for empty tensors.
_MAX_SPAN = 1 << 62


def raw_size(message: wire_pb2.Tensor) -> int:
    """Bytes the tensor had before encoding: its element count times its own dtype's size (0 if unknown)."""
    dtype = _DTYPES.get(message.dtype)
    count = 1
    for size in message.shape:
        count *= max(int(size), 0)
    return count * dtype.numpy.itemsize if dtype else 0


# ------------------------------------------------------------------------------------------ encode
def encode(tensor: torch.Tensor, codec: CodecSpec) -> EncodedTensor:
    """Turn a tensor into a header and payload; lossy encodings touch floating tensors only. Uncompressed, the
    payload is a view of the (contiguous) tensor's own memory.

    Raises :class:`WireError` (``invalid_tensor``) for a dtype or rank the wire cannot carry.
    """
    if not isinstance(tensor, torch.Tensor):
        raise WireError(f"encode needs a torch.Tensor, got {type(tensor).__name__}", code="invalid_tensor")
    wire_dtype = _TORCH_TO_WIRE.get(tensor.dtype)
    if wire_dtype is None:
        names = ", ".join(str(d.torch).removeprefix("torch.") for d in _DTYPES.values())
        raise WireError(f"tensors of dtype {tensor.dtype} cannot travel on the wire; cast to one of {names}",
                        code="invalid_tensor")
    if tensor.dim() > MAX_RANK:
        raise WireError(f"tensor of rank {tensor.dim()} cannot travel on the wire (at most {MAX_RANK})",
                        code="invalid_tensor")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    encoding = codec.encoding if t.is_floating_point() else "raw"
    if encoding in ("fp16", "bf16") and t.element_size() <= 2:
        encoding = "raw"  # already 2 bytes a value: converting would only lose precision or range
    message = wire_pb2.Tensor(dtype=wire_dtype, shape=list(t.shape), encoding=_ENCODING_TO_WIRE[encoding],
                              compression=_COMPRESSION_TO_WIRE[codec.compression])
    if encoding == "raw":
        payload = _as_le_bytes(t)
    elif encoding == "fp16":
        payload = _as_le_bytes(t.to(torch.float16))
    elif encoding == "bf16":
        payload = _as_le_bytes(t.to(torch.bfloat16))
    else:
        q, scale, zero_point, axis = _quantize(t, codec.per_channel)
        payload = _as_le_bytes(q)
        message.scale.extend(scale.tolist())
        message.zero_point.extend(zero_point.tolist())
        message.channel_axis = axis
    message.encoded_size = payload.nbytes
    data = compress(payload, codec.compression)
    message.payload_size = memoryview(data).nbytes
    return EncodedTensor(message, data)


def _as_le_bytes(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy *view* of a contiguous CPU tensor's bytes, little-endian (copied only on big-endian hosts)."""
    if t.dtype == torch.bfloat16:
        array = t.view(torch.int16).numpy()
    elif t.dtype == torch.bool:
        array = t.view(torch.uint8).numpy()
    else:
        array = t.numpy()
    if _BIG_ENDIAN and array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8)


def _quantize(t: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
    """Affine int8 with 0 inside the range and an integer zero point; see the module docstring for NaN/inf."""
    work = t if t.dtype in (torch.float32, torch.float64) else t.float()
    per_channel = per_channel and work.dim() >= 2
    axis = CHANNEL_AXIS if per_channel else -1
    lo, hi = _value_range(work, per_channel)
    # min/max propagate NaN and show infinities, so finite bounds mean an all-finite tensor (the common case).
    all_finite = bool(np.isfinite(lo).all() and np.isfinite(hi).all())
    values = work
    if not all_finite:
        values = torch.where(torch.isfinite(work), work, torch.zeros((), dtype=work.dtype))
        lo, hi = _value_range(values, per_channel)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = ((hi - lo) / 255.0).astype(np.float32)  # what travels; everything below uses it as sent
    scale = np.where(scale > 0, scale, np.float32(1.0))  # constant zero range: any scale decodes 0 exactly
    scale = np.where(np.isfinite(scale), scale, np.float32(_FLOAT32_MAX))
    scale = np.maximum(scale, np.float32(_FLOAT32_TINY)).astype(np.float32)
    zero_point = np.clip(np.round(-128.0 - lo / scale.astype(np.float64)), -128, 127).astype(np.float32)

    shape = [1] * work.dim()
    if per_channel:
        shape[CHANNEL_AXIS] = len(scale)
    scale_t = torch.from_numpy(scale).to(work.dtype).reshape(shape)
    zero_t = torch.from_numpy(zero_point).to(work.dtype).reshape(shape)
    if not all_finite:
        # NaN became 0 above, which lands exactly on the zero point; +inf saturates at the top, -inf the bottom.
        values = torch.where(work == math.inf, torch.from_numpy(hi).to(work.dtype).reshape(shape), values)
        values = torch.where(work == -math.inf, torch.from_numpy(lo).to(work.dtype).reshape(shape), values)
    y = values / scale_t
    y.add_(zero_t).round_().clamp_(-128, 127)
    return y.to(torch.int8), scale, zero_point, axis


def _value_range(values: torch.Tensor, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min and max (float64), per channel along CHANNEL_AXIS or of the whole tensor; zeros when empty."""
    count = values.shape[CHANNEL_AXIS] if per_channel else 1
    if values.numel() == 0:
        return np.zeros(count), np.zeros(count)
    if per_channel:
        dims = tuple(d for d in range(values.dim()) if d != CHANNEL_AXIS)
        return values.amin(dim=dims).double().numpy(), values.amax(dim=dims).double().numpy()
    return np.array([float(values.amin())]), np.array([float(values.amax())])


# ------------------------------------------------------------------------------------------ decode
def wraps_payload(message: wire_pb2.Tensor) -> bool:
    """Whether :func:`decode` wraps the payload's memory instead of working through it: raw and uncompressed
    (except bool, which is checked byte by byte). Such a decode costs microseconds at any size."""
    return message.encoding == wire_pb2.ENCODING_RAW and message.compression == wire_pb2.COMPRESSION_NONE \
        and message.dtype != wire_pb2.DTYPE_BOOL


def decode(message: wire_pb2.Tensor, data: Payload, *, max_bytes: int,
           expected: tuple[torch.dtype, tuple[int, ...]] | None = None) -> torch.Tensor:
    """Rebuild a tensor from a peer's header and payload, refusing anything malformed or bigger than
    ``max_bytes``. The result may share memory with a writable ``data`` (a received frame's own buffer).

    ``max_bytes`` caps the decoded tensor (numel x its dtype's size, never less than the encoded size);
    nothing sized by the peer is allocated before that check, and decompression stops at the declared
    ``encoded_size``. ``expected`` = (dtype, per-sample shape) also checks the tensor against what the
    stage takes. Returns a writable, contiguous tensor of the original dtype and shape.

    Working memory beyond the result is at most the payload, plus one float32 copy when an int8
    payload becomes a float16/bfloat16 tensor.

    Raises :class:`WireError` with ``code="too_large"`` for a tensor over the limit (or a payload that
    decompresses past its declared size), ``code="bad_message"`` for a header that is not a ``Tensor``,
    ``code="invalid_tensor"`` for anything else.
    """
    header = _validate(message, max_bytes=max_bytes, expected=expected)
    if memoryview(data).nbytes != message.payload_size:
        raise _invalid(f"payload has {memoryview(data).nbytes} bytes, the header declares {message.payload_size}")
    payload = decompress(data, header.compression, header.encoded_size)
    try:
        return _materialise(message, header, payload).reshape(header.shape)
    except (ValueError, TypeError, RuntimeError) as exc:  # validated above; this is a last line of defence
        raise WireError(f"tensor payload could not be decoded: {exc}", code="invalid_tensor") from exc


@dataclass(frozen=True)
class _Header:
    dtype: _WireDType
    shape: tuple[int, ...]
    numel: int
    encoding: str
    compression: str
    encoded_size: int


def _invalid(text: str) -> WireError:
    return WireError(f"invalid tensor on the wire: {text}", code="invalid_tensor")


def _validate(message: wire_pb2.Tensor, *, max_bytes: int,
              expected: tuple[torch.dtype, tuple[int, ...]] | None) -> _Header:
    """Every check that needs no allocation sized by the peer, cheapest first."""
    if not isinstance(message, wire_pb2.Tensor):
        raise WireError(f"expected a wire Tensor message, got {type(message).__name__}", code="bad_message")
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise _invalid(f"unknown or unspecified dtype {message.dtype}")
    encoding = _WIRE_TO_ENCODING.get(message.encoding)
    if encoding is None:
        raise _invalid(f"unknown or unspecified encoding {message.encoding}")
    compression = _WIRE_TO_COMPRESSION.get(message.compression)
    if compression is None:
        raise _invalid(f"unknown or unspecified compression {message.compression}")
    if encoding != "raw" and not dtype.torch.is_floating_point:
        raise _invalid(f"encoding {encoding} applies to floating tensors only, not {dtype.torch}")
    if len(message.shape) > MAX_RANK:
        raise _invalid(f"rank {len(message.shape)} is above the limit of {MAX_RANK}")
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape):
        raise _invalid(f"negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    itemsize = dtype.numpy.itemsize
    if numel * itemsize > max_bytes:
        raise WireError(f"tensor of shape {list(shape)} and dtype {dtype.torch} needs {numel * itemsize} bytes, "
                        f"above this node's limit of {max_bytes}; send smaller batches or raise the limit",
                        code="too_large")
    if math.prod(max(s, 1) for s in shape) >= _MAX_SPAN:
        raise _invalid(f"shape {list(shape)} overflows 64-bit strides, although it has no elements")
    encoded = numel * (itemsize if encoding == "raw" else _ENCODING_ITEMSIZE[encoding])
    if message.encoded_size != encoded:
        raise _invalid(f"encoded_size {message.encoded_size} does not match shape {list(shape)} "
                       f"under encoding {encoding} ({encoded} bytes)")
    if expected is not None:
        want_dtype, want_shape = expected
        if dtype.torch != want_dtype:
            raise _invalid(f"dtype {dtype.torch} where this stage takes {want_dtype}")
        if len(shape) != len(want_shape) + 1 or shape[1:] != tuple(want_shape):
            raise _invalid(f"shape {list(shape)} where this stage takes (batch, {', '.join(map(str, want_shape))})")
    _validate_scales(message, encoding, shape)
    return _Header(dtype=dtype, shape=shape, numel=numel, encoding=encoding, compression=compression,
                   encoded_size=encoded)


def _validate_scales(message: wire_pb2.Tensor, encoding: str, shape: tuple[int, ...]) -> None:
    scales, zeros = len(message.scale), len(message.zero_point)
    if encoding != "int8":
        if scales or zeros:
            raise _invalid(f"scale/zero_point given for encoding {encoding} (only int8 has them)")
        return
    axis = message.channel_axis
    if axis == -1:
        want = 1
    elif 0 <= axis < len(shape):
        want = shape[axis]
    else:
        raise _invalid(f"int8 channel_axis {axis} is neither -1 (per tensor) nor an axis of shape {list(shape)}")
    if scales != want or zeros != want:
        raise _invalid(f"int8 needs {want} scale and zero_point values (channel_axis {axis}, shape "
                       f"{list(shape)}), got {scales} and {zeros}")
    if not all(math.isfinite(v) for v in message.scale) or not all(math.isfinite(v) for v in message.zero_point):
        raise _invalid("int8 scale and zero_point must be finite")


def _materialise(message: wire_pb2.Tensor, header: _Header, payload: Payload) -> torch.Tensor:
    """A flat, owned, writable tensor of the original dtype from validated payload bytes."""
    target = header.dtype.torch
    if header.numel == 0:
        return torch.empty(0, dtype=target)
    if header.encoding == "raw":
        if target == torch.bool:  # any non-zero byte is True; torch must never see a bool byte other than 0/1
            return torch.from_numpy(np.frombuffer(payload, np.uint8) != 0)
        stored = _storage(payload, header.dtype.numpy)
        return stored.view(torch.bfloat16) if target == torch.bfloat16 else stored
    if header.encoding == "fp16":
        return _storage(payload, np.dtype("<f2")).to(target)
    if header.encoding == "bf16":
        return _storage(payload, np.dtype("<i2")).view(torch.bfloat16).to(target)
    return _dequantize(message, header, _storage(payload, np.dtype("i1")))


def _storage(payload: Payload, dtype: np.dtype) -> torch.Tensor:
    """The payload as a flat tensor of its storage dtype, writable.

    Writable memory (our own decompression buffer, a received frame's payload buffer) is wrapped without a
    copy; read-only memory is copied once (torch must not wrap it).
    """
    array = np.frombuffer(payload, dtype)
    if memoryview(payload).readonly or not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(array)


def _dequantize(message: wire_pb2.Tensor, header: _Header, q: torch.Tensor) -> torch.Tensor:
    compute = torch.float64 if header.dtype.torch == torch.float64 else torch.float32
    values = q.to(compute)
    scale = torch.tensor(list(message.scale), dtype=compute)
    zero_point = torch.tensor(list(message.zero_point), dtype=compute)
    if message.channel_axis >= 0:
        shape = [1] * len(header.shape)
        shape[message.channel_axis] = -1
        values = values.view(header.shape)
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    values.sub_(zero_point).mul_(scale)
    # |q - zero_point| <= 255 + |zero_point|; if that times the scale can pass the dtype's largest value
    # (the grid reaches scale/2 past the range, e.g. past 65504 for float16) clamp, so int8 never yields inf.
    largest = float(torch.finfo(header.dtype.torch).max)
    reach = (255.0 + max(map(abs, message.zero_point))) * max(map(abs, message.scale))
    if reach >= largest:
        values.clamp_(-largest, largest)
    return values.reshape(-1).to(header.dtype.torch)
