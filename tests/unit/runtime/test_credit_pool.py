"""The node-wide credit pool: one connection keeps its credits as before; many share the pool, the one
holding the least getting each freed credit; a connection that closes gives its unused credits back."""

from __future__ import annotations

from splitexit.runtime.credit_pool import CreditPool, Holding


def receive(holding: Holding, batches: int) -> None:
    holding.received += batches
    assert holding.received <= holding.granted, "a sender never sends past its grant"


def test_one_connection_gets_every_credit_straight_back() -> None:
    pool = CreditPool(size=64, per_connection=16)
    only = pool.join()
    assert only.granted == 16
    for _ in range(100):
        receive(only, 1)
        assert pool.ran(only) == [only]
    assert only.held == 16 and pool.taken == 16


def test_many_connections_share_the_pool_and_the_least_holding_gets_each_freed_credit() -> None:
    pool = CreditPool(size=8, per_connection=4)
    a, b = pool.join(), pool.join()
    c = pool.join()  # the pool is spent: one credit anyway, so that c can make progress
    assert (a.granted, b.granted, c.granted, pool.taken) == (4, 4, 1, 9)
    receive(a, 4)
    assert pool.ran(a) == [], "over-committed by c's credit: the first freed one only pays that back"
    assert pool.ran(a) == [c], "c holds the least"
    receive(c, 2)
    assert pool.ran(c) == [c]  # still the least: c holds 2, a 2, b 4 -> tie with a, granted longest ago
    assert (a.held, b.held, c.held) == (2, 4, 2)
    assert pool.ran(a) == [a] and pool.taken == pool.size
    receive(b, 4)
    granted = [pool.ran(b)[0] for _ in range(4)]
    assert granted.count(b) < 4 and b.held < 4, "the greedy one gets back less than it sent"
    assert pool.taken == pool.size


def test_a_connection_that_closes_gives_its_unused_credits_to_the_others() -> None:
    pool = CreditPool(size=8, per_connection=8)
    a = pool.join()
    b = pool.join()  # a took all 8: b gets one
    assert (a.granted, b.granted) == (8, 1)
    receive(a, 3)  # three of a's batches are in the node, five credits unused
    grants = pool.leave(a)
    assert grants == [b] * 4, "a's five unused credits, less the one b was over"
    assert pool.taken == 8  # b holds 5, a's three batches still run
    for _ in range(3):
        assert pool.ran(a) == [b]  # each of a's batches that finishes frees one more
    assert b.held == 8 and pool.taken == 8
