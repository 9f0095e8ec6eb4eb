"""The meters re-planning reads: what an emulated link really delivers, how long each stage computes."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitexit.config import LinkSpec
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.meter import MIN_REQUESTS, STALE, ComputeMeter, ThroughputMeter


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


def test_compute_meter_averages_each_nodes_span_over_recent_requests() -> None:
    now = [100.0]
    meter = ComputeMeter(window=2.0, clock=lambda: now[0])

    def answered(edge_s: float, cloud_s: float | None) -> list[tuple[str, str, float]]:
        trace = [("edge", "queued", 0.0), ("edge", "compute_start", 1.0), ("edge", "compute_end", 1.0 + edge_s),
                 ("edge", "encoded", 2.0)]
        if cloud_s is not None:
            trace += [("cloud1", "compute_start", 3.0), ("cloud1", "compute_end", 3.0 + cloud_s)]
        return trace

    for i in range(MIN_REQUESTS):
        meter.record(answered(0.010 if i % 2 else 0.020, 0.004 if i < MIN_REQUESTS - 1 else None))
    slow_ones = MIN_REQUESTS - MIN_REQUESTS // 2  # requests 0, 2, 4, ... computed 20 ms at the edge
    expected = (0.010 * (MIN_REQUESTS // 2) + 0.020 * slow_ones) / MIN_REQUESTS
    assert meter.means() == pytest.approx({"edge": expected}), "cloud1 saw too few requests to say"
    meter.record(answered(0.030, None))
    assert meter.means()["edge"] == pytest.approx((expected * MIN_REQUESTS + 0.030) / (MIN_REQUESTS + 1))
    now[0] += 3.0
    assert meter.means() == pytest.approx({"edge": (expected * MIN_REQUESTS + 0.030 - 0.020) / MIN_REQUESTS}), \
        "past the window, the last MIN_REQUESTS requests still count"
    now[0] += STALE
    assert meter.means() == {}, "stale requests count no more"


def test_a_node_too_slow_to_answer_min_requests_in_the_window_is_measured() -> None:
    now = [0.0]
    meter = ComputeMeter(window=2.0, clock=lambda: now[0])
    for _ in range(MIN_REQUESTS):
        now[0] += 1.0  # one answer a second: never MIN_REQUESTS within 2 s
        meter.record([("cloud1", "compute_start", now[0] - 0.9), ("cloud1", "compute_end", now[0])])
    assert meter.means() == pytest.approx({"cloud1": 0.9})
