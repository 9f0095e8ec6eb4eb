"""The in-process registry: key-value, watches and leases, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.registration import Registration
from splitexit.control.registry import WatchEvent
from splitexit.control.registry_backends import open_registry
from splitexit.errors import RegistryUnavailableError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _next(events, timeout: float = 1.0) -> WatchEvent:  # noqa: ANN001
    return await asyncio.wait_for(events.__anext__(), timeout)


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
        assert [await _next(events) for _ in range(3)] == [
            WatchEvent("put", "nodes/a", b"1"), WatchEvent("delete", "nodes/a", None),
            WatchEvent("put", "nodes/b", b"2")]
        await registry.close()
        assert [e async for e in events] == []  # close ends every watch

    asyncio.run(main())


def test_lease_expiry_deletes_its_keys_and_tells_watchers() -> None:
    async def main() -> None:
        clock = FakeClock()
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
        assert await _next(events) == WatchEvent("delete", "nodes/a", None)
        assert await registry.items("nodes/") == {"nodes/free": b"2"}
        assert not await registry.keep_alive(lease)
        with pytest.raises(RegistryUnavailableError, match="lease .* is gone"):
            await registry.put("nodes/a", b"again", lease=lease)

    asyncio.run(main())


def test_reads_agree_with_the_clock_even_before_a_sweep() -> None:
    async def main() -> None:
        clock = FakeClock()
        registry = EmbeddedRegistry(clock=clock)
        lease = await registry.grant(1.0)
        await registry.put("k", b"v", lease=lease)
        clock.now += 1.5
        assert await registry.get("k") is None

    asyncio.run(main())


def test_keep_alive_extends_and_revoke_deletes_now() -> None:
    async def main() -> None:
        clock = FakeClock()
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
        assert await _next(events) == WatchEvent("delete", "k", None)
        assert not await registry.keep_alive(lease)
        await registry.revoke(lease)  # revoking twice is fine

    asyncio.run(main())


def test_a_key_put_again_without_its_lease_outlives_the_lease() -> None:
    async def main() -> None:
        clock = FakeClock()
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
        assert await _next(events, timeout=1.0) == WatchEvent("delete", "k", None)
        await registry.close()

    asyncio.run(main())


def test_registration_registers_again_after_its_lease_was_lost() -> None:
    async def main() -> None:
        registry = open_registry("embedded")
        registration = Registration(registry, "nodes/w1", b"w1", ttl=0.3)
        await registration.start()
        first = registration.lease
        events = registry.watch("nodes/")
        await registry.revoke(first)  # as if it had expired while the registry was out of reach
        assert await _next(events) == WatchEvent("delete", "nodes/w1", None)
        assert await _next(events) == WatchEvent("put", "nodes/w1", b"w1")  # within ttl/3
        assert registration.lease != first
        await registration.update(b"w1 v2")
        assert await _next(events) == WatchEvent("put", "nodes/w1", b"w1 v2")
        await asyncio.sleep(0.5)  # longer than the TTL: kept alive meanwhile
        assert await registry.get("nodes/w1") == b"w1 v2"
        await registration.close()
        assert await _next(events) == WatchEvent("delete", "nodes/w1", None)
        assert await registry.get("nodes/w1") is None

    asyncio.run(main())


class FlakyRegistry(EmbeddedRegistry):
    """An embedded registry whose keep-alives fail while ``down`` is set, as an unreachable etcd's would."""

    down = False

    async def keep_alive(self, lease: int) -> bool:
        if self.down:
            raise RegistryUnavailableError("cannot reach the registry (test)")
        return await super().keep_alive(lease)


def test_registration_survives_an_unreachable_registry(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        registry = FlakyRegistry()
        registration = Registration(registry, "nodes/w1", b"w1", ttl=0.3)
        await registration.start()
        registry.down = True
        await asyncio.sleep(0.6)  # the lease expires meanwhile: nobody can refresh it
        assert await registry.get("nodes/w1") is None
        registry.down = False
        await asyncio.sleep(0.3)
        assert await registry.get("nodes/w1") == b"w1"
        await registration.close()

    asyncio.run(main())
    failures = [r for r in caplog.records if "cannot refresh" in r.getMessage()]
    assert len(failures) == 1  # logged once, however many retries
