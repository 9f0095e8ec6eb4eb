"""The registry in this process: a dict with leases and watches, for one machine (and tests on a fake clock)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from splitexit.control.registry import WatchEvent
from splitexit.errors import RegistryUnavailableError

__all__ = ["EmbeddedRegistry"]

#: Seconds between sweeps for expired leases.
SWEEP_INTERVAL = 0.1


@dataclass
class _Lease:
    ttl: float
    deadline: float
    keys: set[str]


class EmbeddedRegistry:
    """The registry as a dict in this process, for one machine and for tests.

    Every call first expires the leases whose deadline has passed, so reads agree with ``clock``;
    :meth:`start` also sweeps every 0.1 s so that watchers see expiries without anyone calling.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._data: dict[str, tuple[bytes, int | None]] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1
        self._watchers: list[tuple[str, asyncio.Queue[WatchEvent | None]]] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="registry-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for _, queue in self._watchers:
            queue.put_nowait(None)  # ends the watch

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Expire every lease whose deadline has passed: delete its keys and tell the watchers."""
        now = self._clock()
        for lease in [lid for lid, entry in self._leases.items() if entry.deadline <= now]:
            self._drop_lease(lease)

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        self.sweep()
        if lease is not None and lease not in self._leases:
            raise RegistryUnavailableError(f"cannot put {key}: lease {lease} is gone (it expired or was revoked); "
                                           "grant a new one")
        _, old_lease = self._data.get(key, (b"", None))
        if old_lease is not None and old_lease in self._leases:
            self._leases[old_lease].keys.discard(key)
        if lease is not None:
            self._leases[lease].keys.add(key)
        self._data[key] = (value, lease)
        self._notify(WatchEvent("put", key, value))

    async def get(self, key: str) -> bytes | None:
        self.sweep()
        entry = self._data.get(key)
        return entry[0] if entry else None

    async def items(self, prefix: str) -> dict[str, bytes]:
        self.sweep()
        return {key: value for key, (value, _) in sorted(self._data.items()) if key.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self.sweep()
        self._remove(key)

    async def grant(self, ttl: float) -> int:
        lease, self._next_lease = self._next_lease, self._next_lease + 1
        self._leases[lease] = _Lease(ttl, self._clock() + ttl, set())
        return lease

    async def keep_alive(self, lease: int) -> bool:
        self.sweep()
        entry = self._leases.get(lease)
        if entry is None:
            return False
        entry.deadline = self._clock() + entry.ttl
        return True

    async def revoke(self, lease: int) -> None:
        if lease in self._leases:
            self._drop_lease(lease)

    def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        watcher = (prefix, queue)
        self._watchers.append(watcher)  # now, not at the first __anext__: nothing after this call is missed
        return self._drain(watcher)

    async def _drain(self, watcher: tuple[str, asyncio.Queue[WatchEvent | None]]) -> AsyncIterator[WatchEvent]:
        try:
            while (event := await watcher[1].get()) is not None:
                yield event
        finally:
            self._watchers.remove(watcher)

    def _drop_lease(self, lease: int) -> None:
        for key in sorted(self._leases.pop(lease).keys):
            self._remove(key)

    def _remove(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            self._notify(WatchEvent("delete", key, None))

    def _notify(self, event: WatchEvent) -> None:
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)



