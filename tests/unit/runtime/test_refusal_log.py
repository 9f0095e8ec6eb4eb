"""A node's refusal log: one line per kind and caller host per interval, then how many it left out."""

from __future__ import annotations

import logging

import pytest

from fake_clock import FakeClock
from splitexit.runtime.refusal_log import RefusalLog, peer_host


def test_a_refusal_repeated_in_a_loop_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RefusalLog(logging.getLogger("test.refusals"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for port in range(1000, 1100):  # a client retrying, a new connection (port) each time
            log.warning(("token", peer_host(f"ipv4:10.0.0.9:{port}")), "refused %s", "a stream")
        log.warning(("peer", peer_host("ipv4:10.0.0.9:2000")), "refused %s", "another kind")
        log.warning(("token", peer_host("ipv4:10.0.0.7:2000")), "refused %s", "another host")
        clock.now = 10.0
        log.warning(("token", peer_host("ipv4:10.0.0.9:3000")), "refused %s", "again")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a stream", "refused another kind", "refused another host",
        "refused again (99 more like it not logged in the last 10 s)"]
