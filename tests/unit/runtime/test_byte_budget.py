"""The node-wide budget of payload bytes in flight: a batch waits while others hold the bytes it needs, and
one batch larger than the whole budget still goes through, alone."""

from __future__ import annotations

import asyncio

from splitexit.runtime.data_service import ByteBudget


def test_a_batch_waits_for_the_bytes_it_needs_and_a_huge_one_goes_alone() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        events: list[str] = []
        await budget.acquire(60)

        async def take(name: str, size: int) -> None:
            await budget.acquire(size)
            events.append(f"{name} in")

        second = asyncio.ensure_future(take("second", 60))
        await asyncio.sleep(0.01)
        events.append("first out")
        await budget.release(60)
        await asyncio.wait_for(second, 1)
        huge = asyncio.ensure_future(take("huge", 500))
        await asyncio.sleep(0.01)
        assert not huge.done(), "a huge batch waits until nothing else is held"
        events.append("second out")
        await budget.release(60)
        await asyncio.wait_for(huge, 1)
        assert budget.used == 500
        return events

    assert asyncio.run(scenario()) == ["first out", "second in", "second out", "huge in"]
