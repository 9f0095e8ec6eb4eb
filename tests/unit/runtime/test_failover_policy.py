"""The failover policy on a fake clock: bans grow, cap, lapse, and reset on success."""

from __future__ import annotations

from splitexit.runtime.failover import Backoff, NodeBans


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(first=0.25, cap=2.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_node_that_keeps_failing_is_left_out_longer_each_time() -> None:
    clock = FakeClock()
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
    clock = FakeClock()
    bans = NodeBans(Backoff(first=1.0, cap=60.0), clock=clock)
    for _ in range(3):
        bans.fail("w1")
    bans.succeed("w1")
    assert not bans.banned("w1")
    assert bans.fail("w1") == 1.0, "after a success the back-off starts again from the first wait"
