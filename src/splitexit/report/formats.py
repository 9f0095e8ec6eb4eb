"""Numbers and values in the forms every report shares: byte and FLOP counts as text, strict JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["BYTE_UNITS", "format_bytes", "format_flops", "json_line", "jsonable"]

#: Binary units, largest first, for byte counts (tables, plots and pages alike).
BYTE_UNITS = (("MiB", 1 << 20), ("KiB", 1 << 10))
#: Decimal units, largest first, for FLOP counts.
FLOP_UNITS = (("G", 1e9), ("M", 1e6), ("k", 1e3))


def format_bytes(value: float) -> str:
    """``1.5 KiB``, ``310 B``."""
    for unit, scale in BYTE_UNITS:
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_flops(value: float) -> str:
    """``2.40 M``, ``512``."""
    for unit, scale in FLOP_UNITS:
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy scalars become Python ones, non-finite floats ``None`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def json_line(data: object) -> str:
    """One strict JSON object on one line (infinite thresholds become null)."""
    return json.dumps(jsonable(data), allow_nan=False)
