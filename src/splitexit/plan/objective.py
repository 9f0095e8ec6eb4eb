"""What the planner optimises: expected latency, bottleneck throughput, or accuracy within a deadline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from splitexit.errors import ConfigError

__all__ = ["OBJECTIVES", "RELATIVE_TOLERANCE", "Objective"]

OBJECTIVES = ("latency", "throughput", "deadline")
#: Relative slack when comparing predicted times and loads (floating-point noise only).
RELATIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Objective:
    """``latency`` (expected, exit-aware), ``throughput`` (bottleneck), or ``deadline`` (best accuracy within it)."""

    kind: Literal["latency", "throughput", "deadline"] = "latency"
    deadline: float | None = None  # seconds; required for "deadline"

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.kind!r}; use one of {', '.join(OBJECTIVES)}")
        if self.kind == "deadline" and not (self.deadline is not None and self.deadline > 0):
            raise ConfigError("the deadline objective needs a positive deadline, e.g. --deadline 50ms")
