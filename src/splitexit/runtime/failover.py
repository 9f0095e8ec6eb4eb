"""The failover policy in one place: how long a failing node is left out, and how waits grow.

Everything that retries waits with capped exponential back-off from :class:`Backoff`; each loop names its
own first wait and cap where it lives:

- the coordinator leaves a node out of the placement after it failed (its stream broke, or it could not be
  assigned its stage) — 1 s, 2 s, 4 s, ... up to a minute while it keeps failing (:class:`NodeBans`);
  a node that registers anew (a restart) or is assigned successfully starts from zero again;
- a sender reconnects to a replica whose stream broke (``RECONNECT`` in `runtime/replicas.py`);
- the entry sends a request again after its route failed (`runtime/request_path.py`, ``retry:`` in the cluster
  file), until the request's retry time runs out;
- the etcd registry retries a call while etcd is unreachable, and resumes a broken watch
  (``CALL_RETRY``, ``WATCH_RETRY`` in `control/etcd_registry.py`);
- a registration retries refreshing its lease (``REFRESH_RETRY_FIRST`` in `control/registration.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BAN", "Backoff", "NodeBans"]


@dataclass(frozen=True)
class Backoff:
    """Waits of ``first``, ``2·first``, ``4·first``, ... never above ``cap`` seconds."""

    first: float
    cap: float

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure in a row (1-based)."""
        return min(self.cap, self.first * 2 ** max(0, failures - 1))


#: How long the coordinator leaves a failing node out of the placement.
BAN = Backoff(first=1.0, cap=60.0)


@dataclass
class NodeBans:
    """Which nodes are left out of the placement for now, on a clock the tests can drive."""

    backoff: Backoff = BAN
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def fail(self, name: str) -> float:
        """Record a failure of ``name``; returns how many seconds it is left out."""
        self._failures[name] = self._failures.get(name, 0) + 1
        delay = self.backoff.delay(self._failures[name])
        self._until[name] = self.clock() + delay
        return delay

    def succeed(self, name: str) -> None:
        """``name`` worked (or came back as a new process): forget its failures."""
        self._failures.pop(name, None)
        self._until.pop(name, None)

    def banned(self, name: str) -> bool:
        return self._until.get(name, 0.0) > self.clock()

    def allowed(self, names: set[str]) -> set[str]:
        return {name for name in names if not self.banned(name)}

    def lapsed(self) -> list[str]:
        """Nodes whose ban has run out since the last call: time to try them again."""
        now = self.clock()
        done = sorted(name for name, until in self._until.items() if until <= now)
        for name in done:
            del self._until[name]
        return done
