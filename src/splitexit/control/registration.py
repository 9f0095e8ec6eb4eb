"""Keep one key alive in a registry while this process runs (a node's membership)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from splitexit.aio import stop
from splitexit.control.registry import Registry
from splitexit.errors import RegistryUnavailableError
from splitexit.runtime.failover import Backoff

__all__ = ["Registration"]

logger = logging.getLogger(__name__)

#: The lease is refreshed this many times per TTL, so one lost refresh does not lose it.
REFRESHES_PER_TTL = 3
#: First wait before retrying a failed refresh; it doubles up to the refresh interval.
REFRESH_RETRY_FIRST = 0.1


class Registration:
    """Keep ``key`` in ``registry`` while this process runs: put under a lease that a task refreshes.

    The lease is refreshed every ``ttl / REFRESHES_PER_TTL``. If it was lost (it expired while the registry was
    unreachable, or someone revoked it) the key is put again under a new lease; if the key holds anything
    but this value (someone else wrote it), the value is put back. If the registry cannot be
    reached, that is logged once and retried with back-off; the process keeps serving.
    """

    def __init__(self, registry: Registry, key: str, value: bytes, ttl: float, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        """``sleep`` is what the refresh task waits with (a fake clock's in tests)."""
        self.registry, self.key, self.value, self.ttl = registry, key, value, ttl
        self._sleep = sleep
        self.lease: int | None = None
        self.interval = ttl / REFRESHES_PER_TTL
        self.retry = Backoff(first=REFRESH_RETRY_FIRST, cap=self.interval)
        self._lock = asyncio.Lock()  # one (re-)registration at a time, or a stray lease could own the key
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name=f"registration-{self.key}")

    async def update(self, value: bytes) -> None:
        """Put a new value under the same lease (a new one if it was lost meanwhile).

        Raises RegistryUnavailableError if the registry cannot be reached; the new value is kept and put
        when the background task registers again.
        """
        async with self._lock:
            self.value = value
            if self.lease is None or not await self.registry.keep_alive(self.lease):
                await self._register()
            else:
                await self.registry.put(self.key, value, lease=self.lease)

    async def close(self) -> None:
        """Stop refreshing and revoke the lease, so the key goes now rather than after the TTL."""
        if self._task is not None:
            await stop(self._task)
            self._task = None
        if self.lease is not None:
            try:
                await self.registry.revoke(self.lease)
            except RegistryUnavailableError as exc:
                logger.info("could not revoke the lease of %s (%s); it expires within %g s", self.key, exc, self.ttl)
            self.lease = None

    async def _register(self) -> None:
        lease = await self.registry.grant(self.ttl)
        await self.registry.put(self.key, self.value, lease=lease)
        self.lease = lease  # only now: a failed put leaves the old (dead) lease, so the next round retries

    async def _refresh(self) -> None:
        delay, failures = self.interval, 0
        while True:
            await self._sleep(delay)
            try:
                async with self._lock:
                    if self.lease is None or not await self.registry.keep_alive(self.lease):
                        logger.warning("the lease of %s was lost; registering it again", self.key)
                        await self._register()
                    elif await self.registry.get(self.key) != self.value:
                        logger.warning("someone else wrote %s in the registry; putting this node's entry back",
                                       self.key)
                        await self.registry.put(self.key, self.value, lease=self.lease)
            except RegistryUnavailableError as exc:
                if not failures:
                    logger.warning("cannot refresh %s in the registry, retrying: %s", self.key, exc)
                failures += 1
                delay = self.retry.delay(failures)
                continue
            if failures:
                logger.info("refreshed %s in the registry again", self.key)
            delay, failures = self.interval, 0
