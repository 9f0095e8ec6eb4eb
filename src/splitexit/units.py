"""Human units in config files and flags: bandwidth ("20Mbit"), durations ("10ms"), sizes, shapes ("3x224x224")."""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "parse_bandwidth", "parse_duration", "parse_shape", "parse_size"]

_BANDWIDTH = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
              "b/s": 8, "kb/s": 8e3, "mb/s": 8e6, "gb/s": 8e9, "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_DURATION = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]*)\s*$", re.IGNORECASE)


def _parse(text: str | float | int, units: dict[str, float], default: str, what: str, example: str) -> float:
    if isinstance(text, (int, float)):
        return float(text) * units[default]
    match = _NUMBER.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in units):
        raise ValueError(f"{text!r} is not a {what} like {example!r} (units: {', '.join(units)})")
    return float(match.group(1)) * units[unit or default]


def parse_bandwidth(text: str | float | int) -> float:
    """Bits per second; a bare number is bits per second."""
    return _parse(text, _BANDWIDTH, "bit", "bandwidth", "20Mbit")


def parse_duration(text: str | float | int, *, need_unit: bool = False) -> float:
    """Seconds; a bare number is seconds, unless ``need_unit``: in a file, ``latency: 10`` could mean 10 ms as
    well as 10 s, so there only 0 may go without its unit."""
    if isinstance(text, bool):  # YAML's `yes`; bool is an int to Python
        raise ValueError(f"{text!r} is not a duration like '10ms'")
    if need_unit:
        match = _NUMBER.match(str(text))
        if match and not match.group(2) and float(match.group(1)) != 0:
            number = str(text).strip()
            raise ValueError(f"{number} has no unit: give a unit: {number}ms or {number}s")
    return _parse(text, _DURATION, "s", "duration", "10ms")


def format_duration(seconds: float) -> str:
    """``seconds`` with the unit that writes it shortest (``2ms``, ``60s``), read back exactly by
    :func:`parse_duration`: what splitexit writes into a file must load under ``need_unit``."""
    if not math.isfinite(seconds) or seconds < 0:  # no file can say these; from Python only, written as given
        return f"{seconds!r}s"
    written = []
    for unit in ("s", "ms", "us"):
        number = repr(seconds / _DURATION[unit]).removesuffix(".0")
        if _parse(number + unit, _DURATION, "s", "duration", "10ms") == seconds:
            written.append(number + unit)
    return min(written, key=len) if written else f"{seconds!r}s"


def parse_size(text: str | float | int) -> int:
    """Bytes; a bare number is bytes."""
    return int(_parse(text, _SIZE, "b", "size", "64MiB"))


def parse_shape(text: str) -> tuple[int, ...]:
    """A per-sample shape written ``CxHxW`` (any rank, every size positive)."""
    try:
        shape = tuple(int(s) for s in text.strip().lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"{text!r} is not a shape like 3x224x224")
    return shape
