"""Where nodes announce themselves and the coordinator publishes the plan: the registry's protocol.

Two implementations: ``embedded_registry.py`` (a dict in this process; one machine) and
``etcd_registry.py`` (a real etcd, for clusters); ``registration.py`` keeps one key alive under a lease.

Keys are relative strings (``nodes/w1``, ``plan``); each registry applies its own prefix. Liveness is a
lease: a key put under a lease disappears when the lease is not refreshed within its TTL, and watchers see
that as a delete. A watch delivers the changes made after the last state this registry object saw (for
etcd: the revision of its last read or write), so ``items(prefix)`` followed by ``watch(prefix)`` misses
nothing in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Registry", "WatchEvent"]


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix; a lease that expired shows up as a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None


class Registry(Protocol):
    """A key-value store with leases and watches; values are bytes (callers put JSON)."""

    async def start(self) -> None:
        """Connect; RegistryUnavailableError if the registry cannot be reached within a timeout."""

    async def close(self) -> None:
        """Disconnect; every watch ends."""

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        """Set ``key``; under ``lease`` it is deleted when the lease ends (a gone lease is an error)."""

    async def get(self, key: str) -> bytes | None: ...

    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value."""

    async def delete(self, key: str) -> None: ...

    async def grant(self, ttl: float) -> int:
        """A new lease that lives ``ttl`` seconds unless refreshed."""

    async def keep_alive(self, lease: int) -> bool:
        """Refresh ``lease`` once; False if it no longer exists (expired or revoked)."""

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys; a lease that is already gone is fine."""

    def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` after the last state this registry saw; survives registry restarts."""
