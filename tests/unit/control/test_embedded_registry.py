"""The in-process registry: key-value, watches and leases, driven by a fake clock (see also test_registration.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fake_clock import FakeClock
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.registry import WatchEvent
from splitexit.errors import RegistryUnavailableError

#: Seconds a test waits for a watch event that should come at once.
EVENT_TIMEOUT = 1.0


async def next_event(events: AsyncIterator[WatchEvent], timeout: float = EVENT_TIMEOUT) -> WatchEvent:
    return await asyncio.wait_for(anext(events), timeout)


def test_put_get_items_delete() -> None:
    async def main() -> None:
        registry = EmbeddedRegistry()
        await registry.put("nodes/a", b"1")
        await registry.put("nodes/b", b"2")
        await registry.put("plan", b"p")
        await registry.put("nodes/a", b"3")
        assert await registry.get("nodes/a") == b"3"
        assert await registry.get("nodes/zz") is None
        assert await registry.items("nodes/") == {"nodes/a": b"3", "nodes/b": b"2"}
        await registry.delete("nodes/a")
        await registry.delete("nodes/never")  # deleting what is not there is fine
        assert await registry.items("") == {"nodes/b": b"2", "plan": b"p"}

    asyncio.run(main())


def test_watch_sees_puts_and_deletes_under_its_prefix_only() -> None:
    async def main() -> None:
        registry = EmbeddedRegistry()
        await registry.put("nodes/old", b"0")
        events = registry.watch("nodes/")  # changes from here on; nothing is missed before iterating
        await registry.put("nodes/a", b"1")
        await registry.put("plan", b"p")
        await registry.delete("nodes/a")
        await registry.delete("nodes/a")  # nothing left to delete: no event
        await registry.put("nodes/b", b"2")
        assert [await next_event(events) for _ in range(3)] == [
            WatchEvent("put", "nodes/a", b"1"), WatchEvent("delete", "nodes/a", None),
            WatchEvent("put", "nodes/b", b"2")]
        await registry.close()
        assert [e async for e in events] == []  # close ends every watch

    asyncio.run(main())


def test_lease_expiry_deletes_its_keys_and_tells_watchers() -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        registry = EmbeddedRegistry(clock=clock)
        lease = await registry.grant(2.0)
        await registry.put("nodes/a", b"1", lease=lease)
        await registry.put("nodes/free", b"2")
        events = registry.watch("nodes/")
        clock.now += 1.9
        registry.sweep()
        assert await registry.get("nodes/a") == b"1"
        clock.now += 0.2
        registry.sweep()
        assert await next_event(events) == WatchEvent("delete", "nodes/a", None)
        assert await registry.items("nodes/") == {"nodes/free": b"2"}
        assert not await registry.keep_alive(lease)
        with pytest.raises(RegistryUnavailableError, match="lease .* is gone"):
            await registry.put("nodes/a", b"again", lease=lease)

    asyncio.run(main())


def test_reads_agree_with_the_clock_even_before_a_sweep() -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        registry = EmbeddedRegistry(clock=clock)
        lease = await registry.grant(1.0)
        await registry.put("k", b"v", lease=lease)
        clock.now += 1.5
        assert await registry.get("k") is None

    asyncio.run(main())


def test_keep_alive_extends_and_revoke_deletes_now() -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        registry = EmbeddedRegistry(clock=clock)
        lease = await registry.grant(2.0)
        await registry.put("k", b"v", lease=lease)
        for _ in range(5):  # 7.5 s in all, refreshed every 1.5 s
            clock.now += 1.5
            assert await registry.keep_alive(lease)
        registry.sweep()
        assert await registry.get("k") == b"v"
        events = registry.watch("")
        await registry.revoke(lease)
        assert await next_event(events) == WatchEvent("delete", "k", None)
        assert not await registry.keep_alive(lease)
        await registry.revoke(lease)  # revoking twice is fine

    asyncio.run(main())


def test_a_key_put_again_without_its_lease_outlives_the_lease() -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        registry = EmbeddedRegistry(clock=clock)
        lease = await registry.grant(1.0)
        await registry.put("k", b"leased", lease=lease)
        await registry.put("k", b"kept")
        clock.now += 2
        registry.sweep()
        assert await registry.get("k") == b"kept"

    asyncio.run(main())


def test_background_sweeper_expires_leases_on_its_own() -> None:
    async def main() -> None:
        registry = EmbeddedRegistry()  # real clock
        await registry.start()
        lease = await registry.grant(0.2)
        await registry.put("k", b"v", lease=lease)
        events = registry.watch("")
        assert await next_event(events, timeout=1.0) == WatchEvent("delete", "k", None)
        await registry.close()

    asyncio.run(main())
