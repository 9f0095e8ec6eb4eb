"""Refusals a node logs, at most once per kind and caller host per interval: a misconfigured or hostile
client that retries in a loop must not flood the node's log (the metrics still count every refusal)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["REFUSAL_LOG_INTERVAL", "RefusalLog"]

#: Seconds between two log lines for the same kind of refusal from the same host.
REFUSAL_LOG_INTERVAL = 10.0
#: (kind, host) pairs remembered; past this many the memory starts over.
_KEPT = 1024


class RefusalLog:
    def __init__(self, logger: logging.Logger, *, interval: float = REFUSAL_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self._clock = logger, interval, clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (when last logged, refusals not logged since)

    def warning(self, kind: str, peer: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless this kind of refusal from ``peer``'s host was logged lately."""
        key = (kind, peer.rpartition(":")[0] or peer)  # the host: every connection has a port of its own
        now = self._clock()
        last, quiet = self._last.get(key, (-self.interval, 0))
        if now - last < self.interval:
            self._last[key] = (last, quiet + 1)
            return
        if len(self._last) >= _KEPT:
            self._last.clear()
        self._last[key] = (now, 0)
        suffix = f" ({quiet} more like it not logged in the last {self.interval:g} s)" if quiet else ""
        self.logger.warning(message + suffix, *args)
