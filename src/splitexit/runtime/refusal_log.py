"""Refusals logged at most once per key per interval: a misconfigured or hostile client that retries in a
loop, or a rogue registry writer, must not flood the log (a node's metrics still count every refusal)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["REFUSAL_LOG_INTERVAL", "RefusalLog", "peer_host"]

#: Seconds between two log lines for the same kind of refusal from the same host.
REFUSAL_LOG_INTERVAL = 10.0
#: Keys remembered; past this many the memory starts over.
_KEPT = 1024


def peer_host(peer: str) -> str:
    """The host of a gRPC peer (``ipv4:10.0.0.9:50061``): every connection has a port of its own."""
    return peer.rpartition(":")[0] or peer


class RefusalLog:
    """``interval`` may be ``math.inf``: then each key is logged once (until the memory starts over)."""

    def __init__(self, logger: logging.Logger, *, interval: float = REFUSAL_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self._clock = logger, interval, clock
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}  # -> (when last logged, refusals not logged since)

    def warning(self, key: tuple[str, ...], message: str, *args: object) -> None:
        """Log ``message % args`` unless a refusal with this key was logged lately."""
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
