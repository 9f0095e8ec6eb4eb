"""One stage plus the way on: answer the confident rows, forward the rest, relay what comes back.

Everything that moves requests along a chain speaks one small protocol, :class:`Downstream`:
``await send(ids, tensors, trace)`` returns one future per request id, resolved with a
:class:`RowResult` or a :class:`RowError` whenever that row is answered, here or further down.
A :class:`Hop` (a stage executor plus its own downstream) is a Downstream, and so is the data-plane client
to a remote node; a chain of Hops in one process is the in-memory twin of a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from splitexit.runtime.executor import StageExecutor

__all__ = ["Downstream", "Hop", "Outcome", "RowError", "RowResult", "Stamp", "stamp"]

logger = logging.getLogger(__name__)

#: Seconds between looks at a retiring hop's unanswered rows.
IDLE_POLL = 0.1

#: (node, event, wall-clock seconds): one step of a request's trace.
Stamp = tuple[str, str, float]


def stamp(node: str, event: str) -> Stamp:
    return (node, event, time.time())


@dataclass(frozen=True)
class RowResult:
    request_id: int
    exit: int
    prediction: int
    confidence: float
    logits: list[float]
    node: str
    trace: list[Stamp] = field(default_factory=list)


@dataclass(frozen=True)
class RowError:
    request_id: int
    code: str
    message: str
    node: str


Outcome = RowResult | RowError


class Downstream(Protocol):
    async def send(self, ids: Sequence[int], tensors: Any, trace: list[Stamp]) -> list[asyncio.Future]:
        """Hand rows on; one future per id, resolved with a RowResult or RowError."""

    async def close(self) -> None: ...


class Hop:
    """A stage executor and where its unconfident rows go next (``None`` for the last stage)."""

    def __init__(self, node: str, executor: StageExecutor, downstream: Downstream | None):
        self.node = node
        self.executor = executor
        self.downstream = downstream
        self.in_flight = 0

    async def send(self, ids: Sequence[int], tensors: Any, trace: list[Stamp]) -> list[asyncio.Future]:
        """Run the stage on these rows now; forwarded rows' futures resolve when the next hop answers."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ids]
        self.in_flight += len(ids)
        for future in futures:
            future.add_done_callback(self._done)
        trace = [*trace, stamp(self.node, "queued")]
        try:
            reply = await self.executor.run(tensors)
        except Exception as exc:  # noqa: BLE001 - the rows fail, the hop keeps serving
            for request_id, future in zip(ids, futures):
                future.set_result(RowError(request_id, "stage_failed", f"{type(exc).__name__}: {exc}", self.node))
            return futures
        started = reply.started_at or time.time() - reply.compute_s - reply.encode_s
        trace = [*trace, (self.node, "compute_start", started), (self.node, "compute_end", started + reply.compute_s),
                 (self.node, "encoded", started + reply.compute_s + reply.encode_s)]
        for answer in reply.answers:
            futures[answer.position].set_result(RowResult(
                ids[answer.position], answer.exit, answer.prediction, answer.confidence, answer.logits,
                self.node, trace))
        if reply.forward_positions:
            await self._forward(ids, futures, reply.forward_positions, reply.forward, trace)
        return futures

    async def _forward(self, ids: Sequence[int], futures: list[asyncio.Future], positions: list[int],
                       tensors: Any, trace: list[Stamp]) -> None:
        if self.downstream is None:
            for p in positions:
                futures[p].set_result(RowError(ids[p], "no_downstream", "rows left the last stage unanswered; "
                                               "the last stage must end at the model output", self.node))
            return
        onward = await self.downstream.send([ids[p] for p in positions], tensors, trace)
        for p, remote in zip(positions, onward):
            _chain(remote, futures[p])

    def _done(self, _: asyncio.Future) -> None:
        self.in_flight -= 1

    async def close_when_idle(self, timeout: float) -> None:
        """Close once every row sent here is answered, or after ``timeout`` seconds (a retired plan's hop)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(IDLE_POLL)
        await self.close()

    async def close(self) -> None:
        await self.executor.close()
        if self.downstream is not None:
            await self.downstream.close()


def _chain(source: asyncio.Future, target: asyncio.Future) -> None:
    def copy(done: asyncio.Future) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())
    source.add_done_callback(copy)
