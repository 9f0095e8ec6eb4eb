"""A network link emulated inside the sender, so one machine shows the trade-offs of a real hop.

The runtime puts one :class:`EmulatedLink` on each direction of a gRPC stream between neighbours
(requests going down, results coming up). The producer calls ``await link.put(message, nbytes)``; the
task that writes to the real stream calls ``await link.get()``. With nothing emulated the link is a
bounded FIFO and never sleeps, so the same cluster file runs on real links with emulation off.

Semantics (the arithmetic lives in :class:`LinkSchedule`, which never sleeps and is tested exactly):

* **Serialisation.** The link carries one message at a time: *n* bytes occupy it for
  ``n * 8 / bandwidth`` seconds (0 without a bandwidth). A message starts serialising when it is put or
  when the previous one finished, whichever is later (a busy-until clock), so throughput is capped at
  ``bandwidth``. ``put`` returns once its message is serialised, which back-pressures a producer that
  outruns the link.
* **Propagation.** ``delivered_at = serialised_at + latency + uniform(0, jitter)`` from a seeded
  :class:`random.Random`. Latency does not limit throughput: any number of messages can be in flight
  during it (a pipeline); only serialisation is serial.
* **Order.** gRPC streams are ordered, so deliveries never overtake one another:
  ``delivered_at = max(previous delivered_at, computed)``. A late message (jitter, retransmission) holds
  back the ones behind it, as head-of-line blocking does on TCP.
* **Loss.** A reliable stream does not drop messages. With probability ``loss`` a message needs a
  retransmission and arrives one retransmission timeout (RTO) later. The RTO follows RFC 6298 as Linux
  implements it: ``SRTT + 4 * RTTVAR`` with the round trip ``2 * latency`` as SRTT and ``jitter`` as
  RTTVAR, and never below Linux's ``TCP_RTO_MIN`` of 200 ms, i.e. ``max(0.2, 2 * latency + 4 * jitter)``.
  The resent copy is not serialised again: TCP resends a lost segment, not the whole message, so its
  bandwidth cost is small next to the timeout.
* **Changes.** A spec's ``changes`` switch bandwidth and latency at given times, counted from the first
  message any link with that source and target carried in this process (so a link re-opened for a new
  plan keeps the same timeline).
* **Randomness.** ``rng.random()`` is drawn for loss only when ``loss > 0`` and ``rng.uniform(0, jitter)``
  only when ``jitter > 0``, in that order, so a seed reproduces a run exactly.
* **Queue bound.** At most ``max_queued`` messages (default :data:`DEFAULT_MAX_QUEUED`) are between
  ``put`` and ``get`` — in flight or delivered but not yet taken. A further ``put`` waits for room. This
  caps memory when the consumer stalls; on an emulated link it also caps messages in flight, so a link
  of latency *L* carries at most ``max_queued / L`` messages a second (1,280/s at 50 ms by default,
  far above what a window of 16 requests needs).
* **Closing.** ``close()`` stops new ``put`` calls (they raise :class:`RuntimeError`, a bug in the
  caller); calls already waiting for room still go through. Messages already put are still delivered at
  their times; once they are all taken, ``get`` raises :class:`StopAsyncIteration` — chosen over a
  sentinel so that no message value is reserved and ``async for message in link`` ends by itself.

One producer and one consumer per link is the intended use; concurrent producers are served in the
order they get room in the queue, and their messages are serialised one after another. Cancelling a
``put`` after it got room does not take its message back: it is already on the wire. A link belongs to
the event loop that first uses it. Known bias: a producer that calls ``put`` right after the previous one
returned is seen a timer's lateness after the link went idle (about 0.1–1 ms), so back-to-back messages
reach slightly less than ``bandwidth`` — about 1–8 % for 10 ms messages in the tests.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from splitexit.config import LinkSpec
from splitexit.links import retransmission_timeout

__all__ = [
    "DEFAULT_MAX_QUEUED",
    "EmulatedLink",
    "LinkSchedule",
    "LinkStats",
    "Transmission",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 64
"""Messages between ``put`` and ``get``: four times the default request window, room for chunked tensors."""

T = TypeVar("T")

#: When each (source, target) link first carried a message in this process: the origin of its ``changes``.
_ORIGINS: dict[tuple[str, str], float] = {}


class Transmission(NamedTuple):
    """When one message finished serialising and when the far end has it, in the caller's clock."""

    serialised_at: float
    delivered_at: float
    retransmitted: bool


class LinkSchedule:
    """The link's timing as pure arithmetic: no sleeping, the clock is whatever ``now`` callers pass."""

    def __init__(
        self,
        *,
        bandwidth: float | None = None,
        latency: float = 0.0,
        jitter: float = 0.0,
        loss: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"link bandwidth must be positive bits/s or None, got {bandwidth!r}")
        if latency < 0 or jitter < 0 or not 0 <= loss < 1:
            raise ValueError(f"link needs latency >= 0, jitter >= 0 and 0 <= loss < 1, got "
                             f"latency={latency!r}, jitter={jitter!r}, loss={loss!r}")
        self.bandwidth = bandwidth
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.rto = retransmission_timeout(latency, jitter)
        self._rng = rng if rng is not None else random.Random(0)
        self._busy_until = -float("inf")
        self._last_delivery = -float("inf")

    @classmethod
    def from_spec(cls, spec: LinkSpec, rng: random.Random | None = None) -> LinkSchedule:
        """The schedule for one direction of a configured hop."""
        return cls(bandwidth=spec.bandwidth, latency=spec.latency, jitter=spec.jitter, loss=spec.loss, rng=rng)

    def serialisation_time(self, nbytes: int) -> float:
        """Seconds ``nbytes`` occupy the link; 0 without a bandwidth cap."""
        return 0.0 if self.bandwidth is None else nbytes * 8.0 / self.bandwidth

    def schedule(self, nbytes: int, now: float) -> Transmission:
        """Book the link for a message of ``nbytes`` put at ``now`` and say when it leaves and arrives."""
        if nbytes < 0:
            raise ValueError(f"a message cannot have {nbytes} bytes")
        start = max(now, self._busy_until)
        serialised_at = start + self.serialisation_time(nbytes)
        self._busy_until = serialised_at
        retransmitted = self.loss > 0 and self._rng.random() < self.loss
        delivered_at = serialised_at + self.latency
        if self.jitter > 0:
            delivered_at += self._rng.uniform(0.0, self.jitter)
        if retransmitted:
            delivered_at += self.rto
        delivered_at = max(delivered_at, self._last_delivery)
        self._last_delivery = delivered_at
        return Transmission(serialised_at, delivered_at, retransmitted)


@dataclass
class LinkStats:
    """What crossed one direction of a link, for the report's bytes per link."""

    messages: int = 0
    bytes: int = 0
    retransmissions: int = 0
    busy_seconds: float = 0.0
    """Total serialisation time; divided by the run's duration it is the link's utilisation."""


class EmulatedLink(Generic[T]):
    """One direction of a hop: ``put`` on the sender's side, ``get`` where the real stream is written.

    ``spec=None`` or a spec with nothing emulated gives a pass-through link (a bounded FIFO, no sleeps).
    ``seed`` seeds jitter and loss; give each link and direction its own seed for independent draws.
    """

    def __init__(self, spec: LinkSpec | None = None, *, seed: int | None = 0,
                 max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.spec = spec
        self.stats = LinkStats()
        self._schedule: LinkSchedule | None = None
        if spec is not None and spec.emulated:
            self._schedule = LinkSchedule.from_spec(spec, random.Random(seed))
            logger.debug("link %s -> %s emulated: bandwidth=%s bit/s latency=%ss jitter=%ss loss=%s rto=%ss",
                         spec.source, spec.target, spec.bandwidth, spec.latency, spec.jitter, spec.loss,
                         self._schedule.rto)
        self._items: deque[tuple[float, T]] = deque()
        self._room = asyncio.Semaphore(max_queued)
        self._changed = asyncio.Event()
        self._pending_puts = 0
        self._closed = False

    @property
    def emulated(self) -> bool:
        """Whether messages are delayed at all; False means a plain bounded queue."""
        return self._schedule is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        hop = f"{self.spec.source}->{self.spec.target}" if self.spec is not None else "pass-through"
        return f"<EmulatedLink {hop} emulated={self.emulated} closed={self._closed} queued={len(self._items)}>"

    async def put(self, message: T, nbytes: int) -> None:
        """Send ``message`` of ``nbytes`` wire bytes; return once it is serialised (back-pressure)."""
        if self._closed:
            raise RuntimeError(f"put on a closed link {self!r}: stop the producer before closing its link")
        if nbytes < 0:
            raise ValueError(f"a message cannot have {nbytes} bytes")
        self._pending_puts += 1
        try:
            await self._room.acquire()
            self.stats.messages += 1
            self.stats.bytes += nbytes
            if self._schedule is None:
                self._items.append((0.0, message))
                self._changed.set()
                return
            loop = asyncio.get_running_loop()
            now = loop.time()
            if self.spec is not None and self.spec.changes:
                self._follow_changes(self.spec, self._schedule, now)
            sent = self._schedule.schedule(nbytes, now)
            self.stats.busy_seconds += self._schedule.serialisation_time(nbytes)
            self.stats.retransmissions += sent.retransmitted
            # Queue at once, in booking order; the consumer waits for delivered_at anyway.
            self._items.append((sent.delivered_at, message))
            self._changed.set()
            if sent.serialised_at > now:
                await asyncio.sleep(sent.serialised_at - now)
        finally:
            self._pending_puts -= 1
            if self._pending_puts == 0:
                self._changed.set()  # a put cancelled while waiting for room may let the consumer finish

    def _follow_changes(self, spec: LinkSpec, schedule: LinkSchedule, now: float) -> None:
        origin = _ORIGINS.setdefault((spec.source, spec.target), now)
        bandwidth, latency = spec.conditions(now - origin)
        if (bandwidth, latency) != (schedule.bandwidth, schedule.latency):
            logger.info("link %s -> %s now emulates %s bit/s, %.1f ms", spec.source, spec.target, bandwidth,
                        latency * 1e3)
            schedule.bandwidth, schedule.latency = bandwidth, latency

    async def get(self) -> T:
        """The next message, no earlier than its delivery time; :class:`StopAsyncIteration` once closed and drained."""
        loop = asyncio.get_running_loop()
        while True:
            if self._items:
                delivered_at, message = self._items[0]
                delay = delivered_at - loop.time() if self._schedule is not None else 0.0
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # re-check: another consumer may have taken it meanwhile
                self._items.popleft()
                self._room.release()
                return message
            if self._closed and self._pending_puts == 0:
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        """Accept no more messages; the consumer still gets the queued ones, then StopAsyncIteration."""
        self._closed = True
        self._changed.set()

    def __aiter__(self) -> EmulatedLink[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()
