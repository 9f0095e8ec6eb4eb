"""A node's batches, shared fairly among its upstream connections: every connection's credits come from
one pool of ``data_plane.node_credits``.

A connection holds what it was granted and has not yet seen run: its unused credits plus its batches
queued or running in the node. The pool bounds the sum of every connection's holding, so the node's queue
is bounded however many edges connect, not ``credits`` batches per connection. A new connection is granted
up to ``credits`` from what is free, and at least one, so that every sender can make progress. Each batch
that has run frees one; the freed credit goes to the connection holding the least (ties: the one granted
longest ago), among those holding fewer than ``credits``: with one connection it always comes straight
back, as before; with many, a sender that queues more than its share gets credit back only after the
others have theirs, and one that has none left waits (or, at an edge with a fallback, sheds).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

__all__ = ["CreditPool", "Holding"]


@dataclass(eq=False)
class Holding:
    """One connection's batches: granted (at WELCOME, then one per CREDIT), received (accepted to run: a
    frame refused before that is not counted, or its credit would never come back), and run."""

    granted: int = 0
    received: int = 0
    ran: int = 0
    last_grant: int = field(default=0, repr=False)  # the pool's grant count when it last got one (for ties)

    @property
    def held(self) -> int:
        """Credits not yet used plus batches in the node: what this connection takes from the pool."""
        return self.granted - self.ran


class CreditPool:
    """The node-wide pool; :meth:`join` a connection, :meth:`ran` each batch, :meth:`leave` when it closes."""

    def __init__(self, size: int, per_connection: int):
        self.size, self.per_connection = size, per_connection
        self.taken = 0
        self._holdings: list[Holding] = []
        self._grants = itertools.count(1)

    def join(self) -> Holding:
        """A new connection and its first grant: up to ``per_connection`` of what is free, at least 1."""
        holding = Holding()
        self._give(holding, max(1, min(self.per_connection, self.size - self.taken)))
        self._holdings.append(holding)
        return holding

    def ran(self, holding: Holding) -> list[Holding]:
        """One of ``holding``'s batches has run: the connections its freed credit goes to (one each; none
        while the pool is over-committed by connections that joined when it was full)."""
        holding.ran += 1
        self.taken -= 1
        return self._refill()

    def leave(self, holding: Holding) -> list[Holding]:
        """``holding``'s connection closed: its unused credits go back (its batches still in the node give
        theirs back as they run); the connections they go to."""
        self._holdings.remove(holding)
        self.taken -= holding.granted - holding.received
        return self._refill()

    def _refill(self) -> list[Holding]:
        granted = []
        while self.taken < self.size:
            wanting = [h for h in self._holdings if h.held < self.per_connection]
            if not wanting:
                break
            neediest = min(wanting, key=lambda h: (h.held, h.last_grant))
            self._give(neediest, 1)
            granted.append(neediest)
        return granted

    def _give(self, holding: Holding, credits: int) -> None:
        holding.granted += credits
        holding.last_grant = next(self._grants)
        self.taken += credits
