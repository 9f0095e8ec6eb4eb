"""Run a stage on micro-batches in one worker thread, so the event loop never runs torch.

Callers ``await executor.run(tensors, tag)`` from many coroutines at once. The stage's own thread takes
the first waiting job and those queued behind it while they fit in ``max_batch`` rows; only when the stage
is busy (jobs queued up while it computed) does it wait up to ``max_wait`` for more, so a lone request
never waits for company that cannot come. It concatenates them, runs the stage (and the encoding of what
it forwards), hands the replies to the event loop and goes straight on to the next batch: it never waits
for the loop between batches, so receiving, computing and sending consecutive batches overlap.

The rows of a batch that go on leave together: they are encoded once, as one :class:`Onward`, which every
job of the batch shares (so requests gathered into one batch at the edge cross every later link as one
message). Jobs in the executor are bounded: when ``max_pending`` are, ``run`` waits, the caller stops
reading its connection, and its credit does not come back.

The stage computes on the member's device, in its dtype (``runtime/devices.py``); what it forwards is
back on the CPU, in the cut's declared dtypes, before it is encoded. A node's ``slowdown`` stretches each
batch's compute time by sleeping in the worker thread, so one machine can stand in for a slow edge device.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import torch

from splitexit.config import BatchingSpec
from splitexit.model.stages import Stage
from splitexit.model.trace_guard import TRACE_GUARD
from splitexit.runtime.devices import CPU, ComputeDevice, to_device, to_wire
from splitexit.runtime.metrics import ChainMetrics

__all__ = ["Answer", "Onward", "StageExecutor", "StageReply"]

logger = logging.getLogger(__name__)

#: Jobs in the executor (waiting or computing) before `run` blocks (back-pressure).
DEFAULT_MAX_PENDING = 64

Encoded = TypeVar("Encoded")


@dataclass(frozen=True)
class Answer:
    """One row answered by this stage."""

    position: int  # row index within the submitted job
    exit: int
    prediction: int
    confidence: float
    logits: list[float]


@dataclass(eq=False)
class Onward(Generic[Encoded]):
    """The rows of one batch that go on to the next stage, encoded once for every job of the batch."""

    forward: Encoded  # the encoder's output for those rows (the tensors themselves without an encoder)
    rows: list[tuple[int, int]]  # (job, row index within that job) of each forwarded row, in order
    tags: list[object]  # each job's tag, as its caller gave it to `run`, in job order
    _handing: asyncio.Future | None = field(default=None, repr=False)

    async def hand_on_once(self, hand_on: Callable[[Onward[Encoded]], Awaitable[None]]) -> None:
        """Every job of the batch calls this: the first runs ``hand_on``, the others wait until it is done."""
        if self._handing is not None:
            await asyncio.shield(self._handing)
            return
        self._handing = asyncio.get_running_loop().create_future()
        try:
            await hand_on(self)
        finally:
            self._handing.set_result(None)


@dataclass
class StageReply(Generic[Encoded]):
    """What became of one submitted job's rows."""

    answers: list[Answer]
    onward: Onward[Encoded] | None  # the batch's rows that go on, this job's among them (None: none go on)
    compute_s: float  # stage compute of the whole batch, slowdown included
    encode_s: float  # encoding of the whole batch's forwarded rows
    started_at: float  # time.time() as the batch's compute began


@dataclass
class _Job:
    tensors: tuple[torch.Tensor, ...]
    tag: object
    future: asyncio.Future

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0])


class StageExecutor(Generic[Encoded]):
    """Micro-batching front of a :class:`~splitexit.model.stages.Stage`; one thread of its own does the math.

    ``encode`` turns the forwarded tensors into what the transport sends; it runs in that thread too,
    because codecs are CPU work. Without it the tensors themselves are forwarded (in-memory chains).
    """

    def __init__(self, stage: Stage, *, batching: BatchingSpec = BatchingSpec(), slowdown: float = 1.0,
                 encode: Callable[[tuple[torch.Tensor, ...]], Encoded] | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, name: str = "stage", metrics: ChainMetrics | None = None,
                 compute: ComputeDevice = CPU):
        """``metrics``: where batches, exits and rows are counted (default: a registry nobody serves);
        ``compute``: the device and dtype the stage runs in (its net must be on that device already)."""
        self.stage = stage
        self.compute = compute
        self.metrics = metrics or ChainMetrics(name)
        self.batching = batching
        self.slowdown = slowdown
        self.encode = encode
        self.name = name
        self._max_pending = max_pending
        self._slots: asyncio.Semaphore | None = None
        self._jobs: deque[_Job] = deque()  # waiting for the stage's thread
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return len(self._jobs)

    async def run(self, tensors: tuple[torch.Tensor, ...], tag: object = None) -> StageReply[Encoded]:
        """Queue one job (all rows of one incoming batch) and wait for its reply; ``tag`` comes back in the
        :class:`Onward` of its batch, so the caller can tell whose rows go on."""
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._slots = asyncio.Semaphore(self._max_pending)
            self._thread = threading.Thread(target=self._work, args=(loop,), name=f"splitexit-{self.name}",
                                            daemon=True)
            self._thread.start()
        assert self._slots is not None
        async with self._slots:
            job = _Job(tensors, tag, loop.create_future())
            with self._changed:
                if self._closed:
                    raise RuntimeError(f"the stage of {self.name} is closed")
                self._jobs.append(job)
                self._changed.notify()
            return cast(StageReply[Encoded], await job.future)

    async def close(self) -> None:
        """Stop the thread once its batch is done; jobs still waiting fail."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        closed = RuntimeError(f"the stage of {self.name} was closed")
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(closed)

    def _next_batch(self) -> list[_Job] | None:
        """The stage's thread: the next jobs to run together (None once closed): the first waiting, those
        queued behind it, and, if the stage is busy (jobs were queued when it came back for more), those that
        come within ``max_wait``, while their rows fit in ``max_batch`` (one that does not fit starts the next
        batch). A job that finds the stage idle never waits for company that may not come."""
        with self._changed:
            idle = not self._jobs  # nothing queued up behind the last batch: no company is known to be coming
            while not self._jobs and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            jobs, rows = [first], first.rows
            deadline = time.monotonic() + (0.0 if idle else self.batching.max_wait)
            while rows < self.batching.max_batch:
                if self._jobs:
                    if rows + self._jobs[0].rows > self.batching.max_batch:
                        break
                    job = self._jobs.popleft()
                    jobs.append(job)
                    rows += job.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._changed.wait(remaining)
        return [j for j in jobs if not j.future.cancelled()]

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """The stage's thread: batch after batch, each one's replies handed to the loop as it is done."""
        while (jobs := self._next_batch()) is not None:
            if not jobs:
                continue
            try:
                replies: list[StageReply[Encoded]] | BaseException = self._compute(jobs)
            except Exception as exc:  # noqa: BLE001 - every job of the batch gets the error, the thread lives on
                logger.exception("stage compute failed for a batch of %d rows", sum(j.rows for j in jobs))
                replies = exc
            try:
                loop.call_soon_threadsafe(_deliver, jobs, replies)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                return

    def _compute(self, jobs: list[_Job]) -> list[StageReply[Encoded]]:
        """The stage's thread: one stage run over the concatenated jobs; answers split back per job, the rows
        that go on encoded once for all of them."""
        with TRACE_GUARD.shared():  # not while this process traces a model; the wait is not compute
            started_at, started = time.time(), time.perf_counter()
            inputs = jobs[0].tensors if len(jobs) == 1 else \
                tuple(torch.cat(parts) for parts in zip(*(j.tensors for j in jobs)))
            with torch.inference_mode(), self.compute.autocast():
                out = self.stage.run(to_device(inputs, self.compute))
            self.compute.synchronize()
            compute = time.perf_counter() - started
        if self.slowdown > 1:
            time.sleep(compute * (self.slowdown - 1))
            compute *= self.slowdown
        ends = list(itertools.accumulate(j.rows for j in jobs))  # plain Python: a tensor op costs more here
        self.metrics.batch(ends[-1], compute)

        def place(row: int) -> tuple[int, int]:
            """(job, row index within that job) of a row of the concatenated batch."""
            job = bisect.bisect_right(ends, row)
            return job, row - (ends[job - 1] if job else 0)

        answers: list[list[Answer]] = [[] for _ in jobs]
        for row, exit_, prediction, confidence, logits in zip(
                out.rows.tolist(), out.exit.tolist(), out.prediction.tolist(), out.confidence.tolist(),
                out.logits.tolist()):
            job, position = place(row)
            answers[job].append(Answer(position, exit_, prediction, confidence, logits))
        encode_started = time.perf_counter()
        onward: Onward[Encoded] | None = None
        if len(out.forward_rows):
            rows = [place(row) for row in out.forward_rows.tolist()]
            # without an encoder the tensors themselves go on (Encoded is then the tensors' tuple)
            wire = to_wire(out.forward, self.stage.output_tensors or ())  # CPU, contiguous, the declared dtypes
            forward = self.encode(wire) if self.encode is not None else cast(Encoded, wire)
            onward = Onward(forward, rows, [j.tag for j in jobs])
        encode = time.perf_counter() - encode_started
        return [StageReply(mine, onward, compute_s=compute, encode_s=encode, started_at=started_at)
                for mine in answers]


def _deliver(jobs: list[_Job], replies: list[StageReply[Encoded]] | BaseException) -> None:
    """On the loop: each job's reply, or the batch's error."""
    for index, job in enumerate(jobs):
        if job.future.done():
            continue
        if isinstance(replies, BaseException):
            job.future.set_exception(replies)
        else:
            job.future.set_result(replies[index])
