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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

from splitexit.runtime.executor import Onward, StageExecutor

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


@dataclass
class _Rows:
    """One call's rows, as the executor tags its job: where their answers go, and their trace so far."""

    ids: Sequence[int]
    futures: list[asyncio.Future]
    trace: list[Stamp]


class Hop:
    """A stage executor and where its unconfident rows go next (``None`` for the last stage)."""

    def __init__(self, node: str, executor: StageExecutor, downstream: Downstream | None):
        self.node = node
        self.executor = executor
        self.downstream = downstream
        self.in_flight = 0

    async def send(self, ids: Sequence[int], tensors: Any, trace: list[Stamp]) -> list[asyncio.Future]:
        """Run the stage on these rows now; forwarded rows' futures resolve when the next hop answers. Returns
        once the rows that go on are handed on (with those of every call batched with this one)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ids]
        self.in_flight += len(ids)
        for future in futures:
            future.add_done_callback(self._done)
        rows = _Rows(ids, futures, [*trace, stamp(self.node, "queued")])
        metrics = self.executor.metrics
        try:
            reply = await self.executor.run(tensors, rows)
        except Exception as exc:  # noqa: BLE001 - the rows fail, the hop keeps serving
            metrics.rows("failed", len(ids))
            for request_id, future in zip(ids, futures):
                future.set_result(RowError(request_id, "stage_failed", f"{type(exc).__name__}: {exc}", self.node))
            return futures
        metrics.answered(answer.exit for answer in reply.answers)
        metrics.rows("forwarded" if self.downstream is not None else "failed", len(ids) - len(reply.answers))
        started = reply.started_at
        stamps = [(self.node, "compute_start", started), (self.node, "compute_end", started + reply.compute_s),
                  (self.node, "encoded", started + reply.compute_s + reply.encode_s)]
        done = [*rows.trace, *stamps]
        for answer in reply.answers:
            futures[answer.position].set_result(RowResult(
                ids[answer.position], answer.exit, answer.prediction, answer.confidence, answer.logits,
                self.node, done))
        if reply.onward is not None:
            await reply.onward.hand_on_once(lambda onward: self._forward(onward, stamps))
        return futures

    async def _forward(self, onward: Onward, stamps: list[Stamp]) -> None:
        """Send a batch's rows that go on as one batch; each row's answer resolves its own call's future. The
        batch travels with the trace of the first call whose rows it carries: the answers of the other
        calls' rows get their own call's stamps back in front."""
        calls = cast(list[_Rows], onward.tags)
        if self.downstream is None:
            for job, position in onward.rows:
                call = calls[job]
                call.futures[position].set_result(RowError(
                    call.ids[position], "no_downstream", "rows left the last stage unanswered; the last stage "
                    "must end at the model output", self.node))
            return
        lead = calls[onward.rows[0][0]]
        trace = [*lead.trace, *stamps]
        remote = await self.downstream.send([calls[job].ids[p] for job, p in onward.rows], onward.forward, trace)
        own: dict[int, list[Stamp]] = {}
        for (job, position), answer in zip(onward.rows, remote):
            call = calls[job]
            if call is lead:
                _chain(answer, call.futures[position])
            else:
                _chain(answer, call.futures[position], (trace, own.setdefault(job, [*call.trace, *stamps])))

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


def _chain(source: asyncio.Future, target: asyncio.Future,
           retrace: tuple[list[Stamp], list[Stamp]] | None = None) -> None:
    """Resolve ``target`` as ``source`` resolves; ``retrace`` (sent, own) swaps a result's leading stamps
    ``sent`` (another call's) for ``own`` (where the result still begins with them)."""
    def copy(done: asyncio.Future) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            outcome = done.result()
            if retrace is not None and isinstance(outcome, RowResult) and \
                    outcome.trace[:len(retrace[0])] == retrace[0]:
                outcome = replace(outcome, trace=[*retrace[1], *outcome.trace[len(retrace[0]):]])
            target.set_result(outcome)
    source.add_done_callback(copy)
