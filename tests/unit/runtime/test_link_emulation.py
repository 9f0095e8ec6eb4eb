"""The emulated link: exact schedule arithmetic on a fake clock, then the async link on real (short) time."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest

from splitexit.config import LinkSpec
from splitexit.links import MIN_RTO, retransmission_timeout
from splitexit.runtime.link import EmulatedLink, LinkSchedule

logger = logging.getLogger(__name__)


class ScriptedRng(random.Random):
    """Returns the draws a test chose, so clamping and loss are hit on purpose, not by luck."""

    def __init__(self, randoms: tuple[float, ...] = (), uniforms: tuple[float, ...] = ()) -> None:
        super().__init__(0)
        self._randoms = list(randoms)
        self._uniforms = list(uniforms)

    def random(self) -> float:
        return self._randoms.pop(0)

    def uniform(self, a: float, b: float) -> float:
        value = self._uniforms.pop(0)
        assert a <= value <= b
        return value


def link_spec(**effects: object) -> LinkSpec:
    return LinkSpec.model_validate({"from": "edge", "to": "cloud", **effects})


# --- schedule arithmetic (no sleeping) ---------------------------------------------------------------


def test_bandwidth_serialises_one_message_at_a_time():
    schedule = LinkSchedule(bandwidth=8e6)  # 1 MB/s: 1,000 bytes take 1 ms
    times = [schedule.schedule(1000, now=0.0).serialised_at for _ in range(3)]
    assert times == pytest.approx([0.001, 0.002, 0.003])
    # An idle link starts at once; a busy one makes the next message wait for it.
    assert schedule.schedule(1000, now=1.0).serialised_at == pytest.approx(1.001)
    assert schedule.schedule(2000, now=1.0005).serialised_at == pytest.approx(1.003)


def test_throughput_is_capped_by_bandwidth():
    schedule = LinkSchedule(bandwidth=10e6)
    last = [schedule.schedule(12_500, now=0.0) for _ in range(100)][-1]
    assert last.serialised_at == pytest.approx(100 * 12_500 * 8 / 10e6)  # 1 s for 10 Mbit


def test_latency_pipelines_instead_of_adding_up():
    schedule = LinkSchedule(bandwidth=8e6, latency=0.05)
    sent = [schedule.schedule(1000, now=0.0) for _ in range(10)]
    assert [s.delivered_at for s in sent] == pytest.approx([0.001 * (i + 1) + 0.05 for i in range(10)])
    assert sent[-1].delivered_at == pytest.approx(0.06)  # not 10 x 50 ms


def test_without_bandwidth_serialisation_is_instant():
    schedule = LinkSchedule(latency=0.01)
    sent = schedule.schedule(10**9, now=3.0)
    assert sent.serialised_at == 3.0
    assert sent.delivered_at == pytest.approx(3.01)
    assert schedule.serialisation_time(10**9) == 0.0


def test_jitter_never_reorders_deliveries():
    schedule = LinkSchedule(latency=0.01, jitter=0.1, rng=ScriptedRng(uniforms=(0.08, 0.01, 0.0)))
    first = schedule.schedule(100, now=0.0)
    second = schedule.schedule(100, now=0.0)  # would arrive at 0.02, before the first
    third = schedule.schedule(100, now=0.5)
    assert first.delivered_at == pytest.approx(0.09)
    assert second.delivered_at == pytest.approx(0.09)  # held back behind the first
    assert third.delivered_at == pytest.approx(0.51)


def test_jitter_from_a_seeded_rng_is_reproducible_and_ordered():
    def run(seed: int) -> list[float]:
        schedule = LinkSchedule(bandwidth=1e6, latency=0.005, jitter=0.02, rng=random.Random(seed))
        return [schedule.schedule(100, now=i * 0.001).delivered_at for i in range(200)]

    delivered = run(7)
    assert delivered == run(7)
    assert delivered != run(8)
    assert delivered == sorted(delivered)


def test_loss_costs_one_retransmission_timeout():
    schedule = LinkSchedule(latency=0.01, loss=0.3, rng=ScriptedRng(randoms=(0.9, 0.1, 0.9)))
    assert schedule.rto == MIN_RTO
    kept = schedule.schedule(100, now=0.0)
    lost = schedule.schedule(100, now=1.0)
    after = schedule.schedule(100, now=2.0)
    assert (kept.retransmitted, lost.retransmitted, after.retransmitted) == (False, True, False)
    assert kept.delivered_at == pytest.approx(0.01)
    assert lost.delivered_at == pytest.approx(1.0 + 0.01 + MIN_RTO)
    assert after.delivered_at == pytest.approx(2.01)


def test_a_retransmission_holds_back_the_messages_behind_it():
    schedule = LinkSchedule(latency=0.01, loss=0.5, rng=ScriptedRng(randoms=(0.1, 0.9)))
    lost = schedule.schedule(100, now=0.0)
    behind = schedule.schedule(100, now=0.001)
    assert behind.delivered_at == lost.delivered_at == pytest.approx(0.21)


def test_seeded_loss_hits_both_cases_at_about_the_rate():
    schedule = LinkSchedule(latency=0.001, loss=0.25, rng=random.Random(0))
    sent = [schedule.schedule(100, now=float(i)) for i in range(400)]  # 1 s apart: no clamping
    lost = [s for s in sent if s.retransmitted]
    assert 60 < len(lost) < 140
    for i, s in enumerate(sent):
        assert s.delivered_at == pytest.approx(i + 0.001 + (schedule.rto if s.retransmitted else 0.0))


def test_retransmission_timeout_rule():
    assert retransmission_timeout(0.0, 0.0) == MIN_RTO == 0.2
    assert retransmission_timeout(0.01, 0.0) == MIN_RTO
    assert retransmission_timeout(0.2, 0.01) == pytest.approx(0.44)


def test_schedule_from_spec_parses_units():
    schedule = LinkSchedule.from_spec(link_spec(bandwidth="10Mbit", latency="20ms"))
    sent = schedule.schedule(12_500, now=0.0)
    assert sent.serialised_at == pytest.approx(0.01)
    assert sent.delivered_at == pytest.approx(0.03)


def test_schedule_rejects_bad_inputs():
    with pytest.raises(ValueError, match="bytes"):
        LinkSchedule().schedule(-1, now=0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkSchedule(bandwidth=0.0)
    with pytest.raises(ValueError, match="loss"):
        LinkSchedule(loss=1.0)


# --- the async link ----------------------------------------------------------------------------------


def test_emulated_link_pipelines_in_real_time():
    # 10 x 12,500 bytes over 10 Mbit/s = 100 ms on the wire, + 20 ms latency once: ~120 ms, not 10 x 20 ms.
    link: EmulatedLink[int] = EmulatedLink(link_spec(bandwidth="10Mbit", latency="20ms"))
    assert link.emulated

    async def main() -> tuple[float, float, list[int]]:
        start = time.perf_counter()

        async def produce() -> float:
            for i in range(10):
                await link.put(i, 12_500)
            await link.close()
            return time.perf_counter() - start

        producer = asyncio.create_task(produce())
        received = [message async for message in link]
        return await producer, time.perf_counter() - start, received

    produced, total, received = asyncio.run(main())
    logger.info("producer %.3f s, delivery %.3f s", produced, total)
    assert received == list(range(10))
    assert 0.095 <= produced < 0.25  # put waits for serialisation: back-pressure
    assert 0.115 <= total < 0.3
    assert link.stats.messages == 10 and link.stats.bytes == 125_000
    assert link.stats.busy_seconds == pytest.approx(0.1)


def test_each_message_arrives_no_earlier_than_its_latency():
    link: EmulatedLink[str] = EmulatedLink(link_spec(latency="30ms"))

    async def main() -> float:
        await link.put("x", 10)
        start = time.perf_counter()
        assert await link.get() == "x"
        return time.perf_counter() - start

    assert 0.025 <= asyncio.run(main()) < 0.2


@pytest.mark.parametrize("spec", [None, link_spec()], ids=["none", "nothing-emulated"])
def test_pass_through_keeps_order_and_never_sleeps(spec, monkeypatch):
    link: EmulatedLink[int] = EmulatedLink(spec)
    assert not link.emulated

    async def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pass-through link must not sleep")

    async def main() -> list[int]:
        monkeypatch.setattr(asyncio, "sleep", forbidden)
        for i in range(50):
            await link.put(i, 1000)
        await link.close()
        return [message async for message in link]

    assert asyncio.run(main()) == list(range(50))
    assert (link.stats.messages, link.stats.bytes, link.stats.busy_seconds) == (50, 50_000, 0.0)


def test_pass_through_is_bounded_for_back_pressure():
    link: EmulatedLink[int] = EmulatedLink(None, max_queued=2)

    async def main() -> None:
        await link.put(1, 1)
        await link.put(2, 1)
        third = asyncio.create_task(link.put(3, 1))
        await asyncio.sleep(0.01)
        assert not third.done()  # no room until the consumer takes one
        assert await link.get() == 1
        await asyncio.wait_for(third, 1.0)
        assert [await link.get(), await link.get()] == [2, 3]

    asyncio.run(main())


def test_close_drains_then_ends_the_consumer():
    link: EmulatedLink[int] = EmulatedLink(link_spec(latency="10ms"))

    async def main() -> list[int]:
        for i in range(3):
            await link.put(i, 100)
        await link.close()  # the three are still in flight
        received = [message async for message in link]
        with pytest.raises(StopAsyncIteration):
            await link.get()
        with pytest.raises(RuntimeError, match="closed"):
            await link.put(4, 100)
        return received

    assert asyncio.run(main()) == [0, 1, 2]
    assert link.closed


def test_close_wakes_a_consumer_waiting_on_an_empty_link():
    link: EmulatedLink[int] = EmulatedLink(None)

    async def main() -> None:
        consumer = asyncio.create_task(link.get())
        await asyncio.sleep(0.01)
        assert not consumer.done()
        await link.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(consumer, 1.0)

    asyncio.run(main())


def test_a_put_waiting_for_room_at_close_is_still_delivered():
    link: EmulatedLink[str] = EmulatedLink(None, max_queued=1)

    async def main() -> list[str]:
        await link.put("a", 1)
        waiting = asyncio.create_task(link.put("b", 1))
        await asyncio.sleep(0)
        await link.close()
        received = [message async for message in link]
        await waiting
        return received

    assert asyncio.run(main()) == ["a", "b"]


def test_a_cancelled_put_does_not_keep_a_closed_link_open():
    link: EmulatedLink[str] = EmulatedLink(None, max_queued=1)

    async def main() -> list[str]:
        await link.put("a", 1)
        waiting = asyncio.create_task(link.put("b", 1))
        await asyncio.sleep(0)
        await link.close()
        waiting.cancel()
        return await asyncio.wait_for(_collect(link), 1.0)

    assert asyncio.run(main()) == ["a"]
    assert link.stats.messages == 1


def test_counters_count_retransmissions():
    link: EmulatedLink[int] = EmulatedLink(link_spec(bandwidth="1Gbit", loss=0.5), seed=3)

    async def main() -> None:
        for i in range(40):
            await link.put(i, 125)  # 1 us each; the consumer is never started, so nothing waits out an RTO
        await link.close()

    asyncio.run(main())
    assert link.stats.messages == 40 and link.stats.bytes == 5000
    assert 5 < link.stats.retransmissions < 35
    assert link.stats.busy_seconds == pytest.approx(40e-6)


async def _collect(link: EmulatedLink[str]) -> list[str]:
    return [message async for message in link]


def test_link_changes_apply_from_their_time_on() -> None:
    spec = LinkSpec.model_validate({"from": "edge", "to": "cloud1", "bandwidth": "100Mbit", "latency": "10ms",
                                    "changes": [{"at": "5s", "bandwidth": "2Mbit"}, {"at": "9s", "latency": "50ms"}]})
    assert spec.emulated
    assert spec.conditions(0.0) == (100e6, 0.010)
    assert spec.conditions(4.99) == (100e6, 0.010)
    assert spec.conditions(5.0) == (2e6, 0.010)
    assert spec.conditions(60.0) == (2e6, 0.050)
    with pytest.raises(ValueError, match="order"):
        LinkSpec.model_validate({"from": "a", "to": "b", "changes": [{"at": "2s"}, {"at": "1s"}]})


def test_a_link_past_a_skipped_tier_is_the_links_in_series() -> None:
    from splitexit.config import ClusterSpec

    cluster = ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge"}, {"name": "c1", "address": "127.0.0.1:1"},
                  {"name": "c2", "address": "127.0.0.1:2"}],
        "links": [{"from": "edge", "to": "c1", "bandwidth": "20Mbit", "latency": "10ms", "codec": "int8"},
                  {"from": "c1", "to": "c2", "bandwidth": "1Gbit", "latency": "1ms", "loss": 0.5}]})
    through = cluster.link("edge", "c2")
    assert (through.bandwidth, through.codec) == (20e6, "int8")
    assert through.latency == pytest.approx(0.011) and through.loss == pytest.approx(0.5)
    assert not cluster.link("c1", "edge").emulated, "no path backwards: an unemulated default"
