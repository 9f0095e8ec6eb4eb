"""Codec names: what ``raw``, ``fp16+lz4`` or ``int8c+zstd`` in a cluster file or a plan mean.

A codec is an *encoding* (how values become bytes) followed by an optional *compression*; its name is
``<encoding>[+<compression>]``. Encodings (lossy ones apply to floating tensors only; integer and bool
tensors always travel ``raw``, still compressed if the codec says so; float16 and bfloat16 tensors travel
``raw`` under ``fp16`` and ``bf16``, which could not make them smaller, only lossier):

``raw``
    the tensor's own dtype, little-endian, C order. Exact, NaN payloads included.
``fp16``
    values cast to float16 (round to nearest even): relative error <= 2**-11 for ``|x|`` in the normal
    range, absolute error <= 2**-25 below it (6.1e-5); ``|x| > 65504`` becomes ``±inf``. NaN stays NaN,
    ``±inf`` stays ``±inf``.
``bf16``
    values cast to bfloat16: relative error <= 2**-8, about the range of float32 (``|x|`` above
    bfloat16's largest value, 3.39e38, becomes ``±inf``). NaN and ``±inf`` are kept.
``int8`` / ``int8c``
    affine: ``value = (q - zero_point) * scale`` with ``q`` in [-128, 127], one (scale, zero_point) per
    tensor, or (``int8c``) one per channel along axis 1 for tensors of rank >= 2 (``int8c`` of a rank 0
    or 1 tensor is per tensor). The range always includes 0 and the zero point is an integer, so zeros
    (post-ReLU activations are mostly zeros) decode exactly and compress well. Every finite value
    decodes within ``scale / 2`` (plus float32 rounding; plus the rounding of the tensor's own dtype
    for float16 / bfloat16 tensors). A constant-zero range gets ``scale = 1`` (no division by zero).
    Non-finite values cannot be represented: NaN decodes as ``0.0``, ``+inf`` as the top of the range
    (the largest finite value of its channel, or 0) and ``-inf`` as the bottom. float64 values beyond
    the float32 range saturate (the scale travels as float32).

Compression: ``none``, ``lz4`` (lz4 frame, fastest) or ``zstd``
(:data:`~splitexit.wire.compression.ZSTD_LEVEL`).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitexit.errors import ConfigError

__all__ = ["AUTO", "COMPRESSIONS", "ENCODINGS", "CodecSpec", "list_codecs", "parse_codec"]

#: Encoding names in the order ``list_codecs`` and ``choose_codec`` try them (``int8c`` is int8 per channel).
ENCODINGS = ("raw", "fp16", "bf16", "int8")
COMPRESSIONS = ("none", "lz4", "zstd")
#: Not a codec: a request to measure the candidates and pick one (``choose_codec``).
AUTO = "auto"
_PER_CHANNEL_INT8 = "int8c"


@dataclass(frozen=True)
class CodecSpec:
    """One codec: encoding, compression and (int8 only) whether scales run per channel along axis 1."""

    encoding: str = "raw"
    compression: str = "none"
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"unknown codec encoding {self.encoding!r}; use one of {', '.join(ENCODINGS)}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"unknown codec compression {self.compression!r}; use one of {', '.join(COMPRESSIONS)}")
        if self.per_channel and self.encoding != "int8":
            raise ConfigError(f"per-channel scales only exist for int8, not {self.encoding}")

    @property
    def name(self) -> str:
        """The name ``parse_codec`` reads back: ``int8c+zstd``, ``fp16``, ``raw+lz4``, ..."""
        base = _PER_CHANNEL_INT8 if self.per_channel else self.encoding
        return base if self.compression == "none" else f"{base}+{self.compression}"

    @property
    def lossy(self) -> bool:
        return self.encoding != "raw"

    def __str__(self) -> str:
        return self.name


def list_codecs() -> list[str]:
    """Every codec name (encodings x compressions), raw first; feeds parametrised tests and ``auto``."""
    bases = [*ENCODINGS, _PER_CHANNEL_INT8]
    return [CodecSpec(encoding=b.rstrip("c"), compression=c, per_channel=b == _PER_CHANNEL_INT8).name
            for b in bases for c in COMPRESSIONS]


def parse_codec(text: str) -> CodecSpec:
    """Read a codec name such as ``int8+zstd`` (case and surrounding spaces ignored)."""
    name = str(text).strip().lower()
    if name == AUTO:
        raise ConfigError("codec 'auto' is not a codec but a request to pick one: resolve it with "
                          "choose_codec(samples, bandwidth) first")
    if name not in list_codecs():
        raise ConfigError(f"unknown codec {text!r}; valid codecs: {', '.join(list_codecs())} (or auto)")
    base, _, compression = name.partition("+")
    per_channel = base == _PER_CHANNEL_INT8
    return CodecSpec(encoding="int8" if per_channel else base, compression=compression or "none",
                     per_channel=per_channel)
