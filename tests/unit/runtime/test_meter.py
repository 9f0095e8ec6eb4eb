"""The sender's throughput meter measures what an emulated link really delivers."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitexit.config import LinkSpec
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.meter import ThroughputMeter


def test_busy_time_counts_each_message_once_even_when_puts_overlap() -> None:
    meter = ThroughputMeter(clock=lambda: 10.0)
    meter.busy("link", 9.0, 9.5, 1000)  # alone on the link for 0.5 s
    meter.busy("link", 9.0, 10.0, 1000)  # put at the same time, but the link was busy until 9.5
    meter.busy("grpc", 9.6, 9.6)  # a write that did not block adds nothing
    assert meter.bandwidth() == pytest.approx(8 * 2000 / 1.0)


def test_an_idle_link_is_not_measured() -> None:
    meter = ThroughputMeter(clock=lambda: 10.0)
    meter.busy("link", 9.0, 9.0001, 10)
    assert meter.bandwidth() is None


@pytest.mark.parametrize("bandwidth", [2e6, 20e6])
def test_it_finds_an_emulated_links_bandwidth(bandwidth: float) -> None:
    spec = LinkSpec.model_validate({"from": "a", "to": "b", "bandwidth": bandwidth, "latency": "5ms"})

    async def go() -> float | None:
        link: EmulatedLink[bytes] = EmulatedLink(spec)
        meter = ThroughputMeter()
        consumer = asyncio.get_running_loop().create_task(_drain(link))
        for _ in range(20):
            started = time.monotonic()
            await link.put(b"", 5000)
            meter.busy("link", started, time.monotonic(), 5000)
        await link.close()
        await consumer
        return meter.bandwidth()

    measured = asyncio.run(go())
    assert measured == pytest.approx(bandwidth, rel=0.25)


async def _drain(link: EmulatedLink) -> None:
    async for _ in link:
        pass
