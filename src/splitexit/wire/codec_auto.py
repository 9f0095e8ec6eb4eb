"""Resolving codec ``auto``: time every candidate codec on real activations, pick the cheapest for a link.

The choice depends on the samples (activations compress very differently) and on the link's bandwidth
(a fast link rewards a cheap codec, a slow one a small message), so it is measured, not tabled. This runs
torch and takes milliseconds per candidate: callers on an event loop hand it to an executor.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from splitexit.config.codec_names import CodecSpec, list_codecs, parse_codec
from splitexit.errors import ConfigError
from splitexit.wire.tensor_codec import decode, encode

__all__ = ["CodecCost", "CodecTimes", "choose_codec", "measure_codec", "time_codec"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class CodecTimes:
    """One codec on each sample, in sample order: message bytes (header included), encode and decode seconds."""

    codec: CodecSpec
    bytes: tuple[int, ...]
    encode_s: tuple[float, ...]
    decode_s: tuple[float, ...]


def time_codec(samples: Sequence[torch.Tensor], codec: CodecSpec, *, clock: Clock = time.perf_counter,
               warmup: bool = False) -> CodecTimes:
    """Encode and decode every sample once, timing both with ``clock``.

    ``clock`` is called exactly three times per sample, in sample order: before encode, after encode,
    after decode; a test can script it. ``warmup`` first encodes one sample untimed (first calls pay for
    imports and allocator growth).
    """
    if not samples:
        raise ConfigError("measuring a codec needs at least one sample tensor")
    if warmup:
        encode(samples[0], codec)
    sizes, encodes, decodes = [], [], []
    for sample in samples:
        limit = max(1, sample.numel() * sample.element_size())
        start = clock()
        message = encode(sample, codec)
        encoded = clock()
        decode(message.header, message.payload, max_bytes=limit)
        decoded = clock()
        sizes.append(message.header.ByteSize() + message.size)
        encodes.append(encoded - start)
        decodes.append(decoded - encoded)
    return CodecTimes(codec, tuple(sizes), tuple(encodes), tuple(decodes))


@dataclass(frozen=True)
class CodecCost:
    """What one codec costs per message on some samples: wire bytes and encode/decode seconds (means)."""

    codec: CodecSpec
    bytes: float
    encode_s: float
    decode_s: float

    def seconds(self, bandwidth_bps: float | None) -> float:
        """Estimated time per message: encode + decode + transfer (no transfer term without a bandwidth)."""
        transfer = 0.0 if bandwidth_bps is None else self.bytes * 8.0 / bandwidth_bps
        return self.encode_s + self.decode_s + transfer


def measure_codec(samples: Sequence[torch.Tensor], codec: CodecSpec, *, clock: Clock = time.perf_counter
                  ) -> CodecCost:
    """The mean cost of ``codec`` per message on ``samples`` (see :func:`time_codec` for ``clock``)."""
    times = time_codec(samples, codec, clock=clock)
    n = len(samples)
    return CodecCost(codec=codec, bytes=sum(times.bytes) / n, encode_s=sum(times.encode_s) / n,
                     decode_s=sum(times.decode_s) / n)


def choose_codec(samples: list[torch.Tensor], bandwidth_bps: float | None, candidates: list[str] | None = None,
                 *, lossy: bool = True, clock: Clock = time.perf_counter) -> CodecSpec:
    """Resolve codec ``auto``: the candidate with the least estimated time per message on these samples.

    Cost = encode + decode + bytes x 8 / bandwidth, each measured on ``samples`` (activations crossing the
    cut). Without a bandwidth the link is taken as free and the fastest codec wins (usually raw).
    ``lossy=False`` keeps only raw codecs. Candidates are measured in the order given (default:
    :func:`~splitexit.wire.codec_names.list_codecs`), see :func:`time_codec` for how ``clock`` is called;
    ties go to the earlier candidate, so the result is deterministic given the timings.
    """
    if bandwidth_bps is not None and not (bandwidth_bps > 0 and math.isfinite(bandwidth_bps)):
        raise ConfigError(f"bandwidth must be a positive number of bits per second, got {bandwidth_bps}")
    specs = [parse_codec(name) for name in (candidates if candidates is not None else list_codecs())]
    if not lossy:
        specs = [s for s in specs if not s.lossy]
    if not specs:
        raise ConfigError(f"no codec to choose from among {candidates} (lossy={lossy}); include a raw codec")
    if not samples:
        raise ConfigError("choosing a codec needs at least one sample of the tensors crossing the cut; "
                          "profile the model first")
    costs = [measure_codec(samples, spec, clock=clock) for spec in specs]
    best = min(range(len(costs)), key=lambda i: (costs[i].seconds(bandwidth_bps), i))
    for cost in costs:
        logger.debug("codec %-11s %10.0f B  encode %.6f s  decode %.6f s  total %.6f s", cost.codec.name,
                     cost.bytes, cost.encode_s, cost.decode_s, cost.seconds(bandwidth_bps))
    logger.info("codec auto -> %s (bandwidth %s bit/s)", costs[best].codec.name, bandwidth_bps)
    return costs[best].codec
