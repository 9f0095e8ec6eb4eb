"""The failover policy on a fake clock: bans grow, cap, lapse, and reset on success."""

from __future__ import annotations

from fake_clock import FakeClock
from splitexit.runtime.failover import BAN, Backoff, NodeBans


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(first=0.25, cap=2.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_node_that_keeps_failing_is_left_out_longer_each_time() -> None:
    clock = FakeClock(100.0)
    bans = NodeBans(Backoff(first=1.0, cap=4.0), clock=clock)
    waits = []
    for _ in range(4):
        waits.append(bans.fail("w2"))
        assert bans.banned("w2") and bans.allowed({"w1", "w2"}) == {"w1"}
        clock.now += waits[-1] - 0.01
        assert bans.banned("w2") and bans.lapsed() == []
        clock.now += 0.02
        assert not bans.banned("w2")
        assert bans.lapsed() == ["w2"] and bans.lapsed() == []  # reported once, so one re-plan follows
    assert waits == [1.0, 2.0, 4.0, 4.0]


def test_success_or_a_restart_forgets_the_failures() -> None:
    clock = FakeClock(100.0)
    bans = NodeBans(Backoff(first=1.0, cap=60.0), clock=clock)
    for _ in range(3):
        bans.fail("w1")
    bans.succeed("w1")
    assert not bans.banned("w1")
    assert bans.fail("w1") == 1.0, "after a success the back-off starts again from the first wait"


def test_the_coordinators_ban_doubles_from_a_second_up_to_a_minute() -> None:
    clock = FakeClock(100.0)
    bans = NodeBans(clock=clock)
    assert bans.backoff == BAN
    assert [bans.fail("w1") for _ in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    clock.now += 59.9
    assert bans.allowed({"w1", "w2"}) == {"w2"}
    clock.now += 0.2
    assert bans.allowed({"w1", "w2"}) == {"w1", "w2"}
    assert bans.fail("w1") == 60.0, "a lapsed ban is not a success: the next failure stays at the cap"
