"""Codec auto: the cheapest codec for the link wins, on timings a test can script."""

from __future__ import annotations

import pytest
import torch

from splitexit.config.codec_names import list_codecs, parse_codec
from splitexit.errors import ConfigError
from splitexit.wire.codec_auto import choose_codec, measure_codec, time_codec

#: Modelled encode / decode seconds per message for every codec (the shape of real measurements).
TIMINGS = {
    "raw": (1e-4, 1e-4), "raw+lz4": (2e-3, 5e-4), "raw+zstd": (3e-3, 1.2e-3),
    "fp16": (2e-4, 2e-4), "fp16+lz4": (1e-3, 3e-4), "fp16+zstd": (1.5e-3, 6e-4),
    "bf16": (2e-4, 2e-4), "bf16+lz4": (1e-3, 3e-4), "bf16+zstd": (1.5e-3, 6e-4),
    "int8": (3e-4, 2e-4), "int8+lz4": (7e-4, 3e-4), "int8+zstd": (1e-3, 4e-4),
    "int8c": (4e-4, 3e-4), "int8c+lz4": (8e-4, 4e-4), "int8c+zstd": (1.1e-3, 5e-4),
}


class ScriptedClock:
    """Replays the encode/decode durations of TIMINGS in the order measure_codec documents."""

    def __init__(self, candidates: list[str], samples: int):
        self.times: list[float] = []
        now = 0.0
        for name in candidates:
            encode_s, decode_s = TIMINGS[name]
            for _ in range(samples):
                self.times += [now, now + encode_s, now + encode_s + decode_s]
                now += encode_s + decode_s + 1.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.times[self.calls - 1]

    @property
    def exhausted(self) -> bool:
        return self.calls == len(self.times)


def _activations() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.relu(torch.randn(8, 32, 16, 16, generator=generator)) for _ in range(2)]


@pytest.mark.parametrize(("bandwidth", "expected"), [(100e9, "raw"), (10e6, "int8+zstd"), (None, "raw")])
def test_choose_codec_follows_the_link(bandwidth: float | None, expected: str) -> None:
    samples = _activations()
    clock = ScriptedClock(list_codecs(), len(samples))
    assert choose_codec(samples, bandwidth, clock=clock).name == expected
    assert clock.exhausted


def test_choose_codec_lossless_only_and_explicit_candidates() -> None:
    samples = _activations()
    raw_family = ["raw", "raw+lz4", "raw+zstd"]
    clock = ScriptedClock(raw_family, len(samples))
    assert choose_codec(samples, 10e6, lossy=False, clock=clock).name == "raw+zstd"
    clock = ScriptedClock(["fp16", "int8+lz4"], len(samples))
    assert choose_codec(samples, 10e6, ["fp16", "int8+lz4"], clock=clock).name == "int8+lz4"


def test_choose_codec_ties_go_to_the_first_candidate() -> None:
    samples = [torch.zeros(4, 4)]
    assert choose_codec(samples, None, ["raw", "raw"], clock=lambda: 0.0).name == "raw"
    assert choose_codec(samples, None, ["fp16", "raw"], clock=lambda: 0.0).name == "fp16"


def test_measure_codec_reports_means_per_message() -> None:
    samples = _activations()
    cost = measure_codec(samples, parse_codec("int8+zstd"), clock=ScriptedClock(["int8+zstd"], len(samples)))
    assert cost.encode_s == pytest.approx(1e-3) and cost.decode_s == pytest.approx(4e-4)
    assert 0 < cost.bytes < samples[0].numel()  # well under 1 byte per value on post-ReLU activations
    assert cost.seconds(8e6) == pytest.approx(1.4e-3 + cost.bytes / 1e6)


def test_choose_codec_with_the_real_clock_returns_a_candidate() -> None:
    assert choose_codec(_activations(), 1e9, ["raw", "int8+lz4"]).name in ("raw", "int8+lz4")


@pytest.mark.parametrize(
    ("samples", "bandwidth", "candidates", "lossy"),
    [([], 1e6, None, True), ([torch.zeros(2)], 0.0, None, True), ([torch.zeros(2)], 1e6, ["int8"], False),
     ([torch.zeros(2)], 1e6, ["gzip"], True), ([torch.zeros(2)], 1e6, [], True)],
)
def test_choose_codec_bad_arguments(samples: list[torch.Tensor], bandwidth: float, candidates: list[str] | None,
                                    lossy: bool) -> None:
    with pytest.raises(ConfigError):
        choose_codec(samples, bandwidth, candidates, lossy=lossy)


def test_time_codec_keeps_each_sample_and_its_warm_up_is_untimed() -> None:
    samples = _activations()
    clock = ScriptedClock(["raw+lz4"], len(samples))
    times = time_codec(samples, parse_codec("raw+lz4"), clock=clock, warmup=True)
    assert clock.exhausted, "the warm-up encode reads no clock"
    assert times.encode_s == pytest.approx((2e-3,) * len(samples))
    assert times.decode_s == pytest.approx((5e-4,) * len(samples))
    assert len(times.bytes) == len(samples) and all(b > 0 for b in times.bytes)
