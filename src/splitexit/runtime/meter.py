"""What the running chain really delivers, measured while it serves (for re-planning).

:class:`ThroughputMeter`: how fast a link is, measured by the sender while it sends.

The sender records, per message, its size and the time the link was busy with *it*: from when it could
start (after the message before it) to when it was handed on — put on the emulated link (its serialisation
time there) or, on a link the cluster file does not emulate, written to the connection (the time flow
control held the write). Over a sliding window
that gives the throughput the link delivers while it is in use, whatever its configured bandwidth.

:class:`ComputeMeter`: how long each node's stage computes per request, from the answers' traces (the
``compute_start`` and ``compute_end`` stamps every stage adds), over the same sliding window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

__all__ = ["ComputeMeter", "ThroughputMeter"]

#: Seconds of recent messages the estimate covers.
WINDOW = 2.0
#: Below this much busy time in the window the link is too idle (or too fast) to measure.
MIN_BUSY = 0.005
#: Fewer requests than this through a node tell nothing about its compute.
MIN_REQUESTS = 5
#: Seconds after which a request's compute span says nothing any more, however few came since.
STALE = 30.0


class ThroughputMeter:
    def __init__(self, *, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self._samples: deque[tuple[float, int, float]] = deque()  # (when, bytes, busy seconds)
        self._free_at: dict[str, float] = {}

    def busy(self, lane: str, started: float, finished: float, nbytes: int = 0) -> None:
        """A message held ``lane`` from ``started`` (or when the lane was free) to ``finished``."""
        busy = max(0.0, finished - max(started, self._free_at.get(lane, 0.0)))
        self._free_at[lane] = max(self._free_at.get(lane, 0.0), finished)
        self._samples.append((finished, nbytes, busy))
        self._trim(finished)

    def bandwidth(self) -> float | None:
        """Bits per second over the window while busy; None when there is too little to tell."""
        self._trim(self.clock())
        busy = sum(s[2] for s in self._samples)
        if busy < MIN_BUSY:
            return None
        return 8 * sum(s[1] for s in self._samples) / busy

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()


class ComputeMeter:
    """Each node's compute seconds per request: the mean over the window, or, where fewer than
    ``MIN_REQUESTS`` came through it in the window (a node that slow is exactly what re-planning must see),
    over its last ``MIN_REQUESTS`` requests of the last ``STALE`` seconds."""

    def __init__(self, *, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self._spans: dict[str, deque[tuple[float, float]]] = {}  # node -> (when, compute seconds)

    def record(self, trace: Iterable[tuple[str, str, float]]) -> None:
        """Note the compute span of every stage one answered request went through."""
        starts: dict[str, float] = {}
        now = self.clock()
        for node, event, at in trace:
            if event == "compute_start":
                starts[node] = at
            elif event == "compute_end" and node in starts:
                self._spans.setdefault(node, deque()).append((now, max(0.0, at - starts.pop(node))))
        self._trim(now)

    def clear(self) -> None:
        self._spans.clear()

    def means(self) -> dict[str, float]:
        """Mean compute seconds per request of every node seen often enough lately."""
        self._trim(self.clock())
        return {node: sum(s for _, s in spans) / len(spans)
                for node, spans in self._spans.items() if len(spans) >= MIN_REQUESTS}

    def _trim(self, now: float) -> None:
        for node, spans in list(self._spans.items()):
            while spans and (spans[0][0] < now - STALE or
                             (spans[0][0] < now - self.window and len(spans) > MIN_REQUESTS)):
                spans.popleft()
            if not spans:
                del self._spans[node]
