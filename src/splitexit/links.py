"""The arithmetic of a link, shared by the emulation that imposes it and the planner that predicts it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

__all__ = ["MIN_RTO", "LinkFigures", "in_series", "retransmission_timeout"]

MIN_RTO = 0.2
"""Seconds; Linux's ``TCP_RTO_MIN``, the shortest time before a lost segment is resent."""


def retransmission_timeout(latency: float, jitter: float) -> float:
    """RFC 6298's ``SRTT + 4 * RTTVAR`` for a steady link, floored at Linux's 200 ms minimum."""
    return max(MIN_RTO, 2.0 * latency + 4.0 * jitter)


class _HasFigures(Protocol):
    @property
    def bandwidth(self) -> float | None: ...
    @property
    def latency(self) -> float: ...
    @property
    def jitter(self) -> float: ...
    @property
    def loss(self) -> float: ...


class LinkFigures(NamedTuple):
    """What a link does to a message: bits/s (None: unlimited), seconds of latency and jitter, loss rate."""

    bandwidth: float | None
    latency: float
    jitter: float
    loss: float


def in_series(links: Sequence[_HasFigures]) -> LinkFigures:
    """Links one after another (a skipped tier): the narrowest bandwidth; latencies and jitters add; the
    chances of getting through multiply."""
    widths = [link.bandwidth for link in links if link.bandwidth is not None]
    return LinkFigures(bandwidth=min(widths) if widths else None, latency=sum(link.latency for link in links),
                       jitter=sum(link.jitter for link in links),
                       loss=1.0 - math.prod(1.0 - link.loss for link in links))
