"""Human units in config files and flags: what parses to what, and what is refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from splitexit.units import parse_bandwidth, parse_duration, parse_shape, parse_size


@pytest.mark.parametrize("text, bits_per_second", [
    ("20Mbit", 20e6), ("1Gbit", 1e9), ("500kbit", 500e3), ("64bit", 64.0), ("1.5 Mbit", 1.5e6),
    ("10mbps", 10e6), ("2Gbps", 2e9), ("100bps", 100.0),
    ("1MB/s", 8e6), ("1 kb/s", 8e3), ("3b/s", 24.0), ("1gb/s", 8e9),
    ("1e6", 1e6), ("2.5e3kbit", 2.5e6), (" 7 ", 7.0), ("7", 7.0), (1000, 1000.0), (2.5, 2.5),
])
def test_bandwidth(text: str | float, bits_per_second: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bits_per_second)


@pytest.mark.parametrize("text, seconds", [
    ("10ms", 0.010), ("2s", 2.0), ("250us", 250e-6), ("0.5 s", 0.5), ("1.5", 1.5), ("0", 0.0), ("1e-3s", 1e-3),
    ("5MS", 0.005), (3, 3.0), (0.25, 0.25),
])
def test_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, size", [
    ("64MiB", 64 * 1024**2), ("1KiB", 1024), ("2GiB", 2 * 1024**3), ("1kb", 1000), ("3MB", 3_000_000),
    ("1gb", 10**9), ("512b", 512), ("4096", 4096), (1024, 1024), ("1.5KiB", 1536),
])
def test_size(text: str | int, size: int) -> None:
    result = parse_size(text)
    assert result == size and isinstance(result, int)


@pytest.mark.parametrize("parse, text, what", [
    (parse_bandwidth, "fast", "bandwidth like '20Mbit'"),
    (parse_bandwidth, "20Mbits", "bandwidth"),
    (parse_bandwidth, "20 furlongs", "bandwidth"),
    (parse_bandwidth, "-1Mbit", "bandwidth"),
    (parse_bandwidth, "", "bandwidth"),
    (parse_duration, "10 minutes", "duration like '10ms'"),
    (parse_duration, "1h", "duration"),
    (parse_duration, "ms", "duration"),
    (parse_duration, "1..2s", "duration"),
    (parse_size, "64MiBs", "size like '64MiB'"),
    (parse_size, "big", "size"),
    (parse_size, "1TB", "size"),
])
def test_bad_input_names_the_kind_an_example_and_the_units(parse: Callable[[str], float], text: str,
                                                         what: str) -> None:
    with pytest.raises(ValueError, match=what) as caught:
        parse(text)
    assert repr(text) in str(caught.value) and "units:" in str(caught.value)


@pytest.mark.parametrize("text, shape", [("3x224x224", (3, 224, 224)), ("10", (10,)), (" 1X8X8 ", (1, 8, 8))])
def test_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "3x", "x3", "3x0x4", "3x-1", "axb", "3*4"])
def test_bad_shapes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a shape like 3x224x224"):
        parse_shape(text)
