"""A clock for unit tests: reading it gives the fake time, and its ``sleep`` wakes only when the test moves time on."""

from __future__ import annotations

import asyncio
import heapq
import itertools

#: Loop turns ``advance`` lets run after each wake-up, so woken tasks reach their next wait.
SETTLE_TURNS = 20


async def settle() -> None:
    """Let every ready task run until it waits again."""
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)


class FakeClock:
    """``clock()`` is the time; ``await clock.sleep(s)`` returns once ``advance`` has moved past it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.slept: list[float] = []  # every sleep asked for, in order
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), wake))
        await wake

    async def advance(self, seconds: float) -> None:
        """Move time on by ``seconds``, waking the sleepers due on the way, earliest first."""
        target = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            due, _, wake = heapq.heappop(self._sleepers)
            self.now = max(self.now, due)
            if not wake.done():
                wake.set_result(None)
            await settle()
        self.now = target
        await settle()
