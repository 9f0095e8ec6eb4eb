"""A registration keeps its key in the registry: it registers again after losing its lease, puts its value
back when someone else wrote the key, and retries an unreachable registry with back-off (on the embedded
registry; against etcd: tests/system/test_etcd_registry.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fake_clock import FakeClock, settle
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.registration import REFRESH_RETRY_FIRST, Registration
from splitexit.control.registry import WatchEvent
from splitexit.control.registry_backends import open_registry
from splitexit.errors import RegistryUnavailableError

#: Seconds a test waits for a watch event that should come at once.
EVENT_TIMEOUT = 1.0


async def next_event(events: AsyncIterator[WatchEvent], timeout: float = EVENT_TIMEOUT) -> WatchEvent:
    return await asyncio.wait_for(anext(events), timeout)


def test_registration_registers_again_after_its_lease_was_lost() -> None:
    async def main() -> None:
        registry = open_registry("embedded")
        registration = Registration(registry, "nodes/w1", b"w1", ttl=0.3)
        await registration.start()
        first = registration.lease
        assert first is not None
        events = registry.watch("nodes/")
        await registry.revoke(first)  # as if it had expired while the registry was out of reach
        assert await next_event(events) == WatchEvent("delete", "nodes/w1", None)
        assert await next_event(events) == WatchEvent("put", "nodes/w1", b"w1")  # within ttl/3
        assert registration.lease != first
        await registration.update(b"w1 v2")
        assert await next_event(events) == WatchEvent("put", "nodes/w1", b"w1 v2")
        await asyncio.sleep(0.5)  # longer than the TTL: kept alive meanwhile
        assert await registry.get("nodes/w1") == b"w1 v2"
        await registration.close()
        assert await next_event(events) == WatchEvent("delete", "nodes/w1", None)
        assert await registry.get("nodes/w1") is None

    asyncio.run(main())


def test_a_registration_puts_its_entry_back_when_someone_else_overwrote_or_deleted_it() -> None:
    async def main() -> None:
        registry = open_registry("embedded")
        registration = Registration(registry, "nodes/w1", b"w1", ttl=0.3)
        await registration.start()
        events = registry.watch("nodes/")
        await registry.put("nodes/w1", b"forged")  # a rogue writer, no lease of ours
        assert await next_event(events) == WatchEvent("put", "nodes/w1", b"forged")
        assert await next_event(events) == WatchEvent("put", "nodes/w1", b"w1")  # within ttl/3
        await registry.delete("nodes/w1")
        assert await next_event(events) == WatchEvent("delete", "nodes/w1", None)
        assert await next_event(events) == WatchEvent("put", "nodes/w1", b"w1")
        await registration.close()
        assert await registry.get("nodes/w1") is None, "the entry put back is under the registration's lease"

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


def test_refresh_retries_wait_from_the_first_back_off_up_to_the_refresh_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        registry = FlakyRegistry(clock=clock)
        registration = Registration(registry, "nodes/w1", b"w1", ttl=3.0, sleep=clock.sleep)
        await registration.start()
        await settle()
        assert clock.slept == [registration.interval] == [1.0]
        registry.down = True
        await clock.advance(2.6)  # the refresh at 1 s fails, then retries after 0.1, 0.2, 0.4 and 0.8 s
        assert clock.slept == pytest.approx([1.0, REFRESH_RETRY_FIRST, 0.2, 0.4, 0.8, 1.0])  # capped at the interval
        registry.down = False
        await clock.advance(1.0)  # the lease ran out at 3 s; the retry at 3.5 s registers again
        assert await registry.get("nodes/w1") == b"w1"
        assert clock.slept[-1] == registration.interval, "back to refreshing every interval"
        await registration.close()

    asyncio.run(main())
    assert len([r for r in caplog.records if "cannot refresh" in r.getMessage()]) == 1
