"""Run a stage on micro-batches in one worker thread, so the event loop never runs torch.

Callers ``await executor.run(tensors)`` from many coroutines at once. A batcher task takes the first
waiting job, gathers more for up to ``max_wait`` until ``max_batch`` rows are queued, concatenates them,
and runs the stage (and the encoding of what it forwards) in the worker thread. The job queue is
bounded: when it is full, ``run`` waits, the caller stops reading its stream, and gRPC flow control
pushes back on the sender.

A node's ``slowdown`` stretches each batch's compute time by sleeping in the worker thread, so one
machine can stand in for a slow edge device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import torch

from splitexit.config import BatchingSpec
from splitexit.model.stages import Stage
from splitexit.model.trace_guard import TRACE_GUARD

__all__ = ["Answer", "StageExecutor", "StageReply"]

logger = logging.getLogger(__name__)

#: Jobs waiting for the batcher before `run` blocks (back-pressure).
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


@dataclass
class StageReply(Generic[Encoded]):
    """What became of one submitted job's rows."""

    answers: list[Answer]
    forward_positions: list[int]  # row indices within the job that go on, in the order of `forward`
    forward: Encoded | None  # the encoder's output for those rows (None when nothing goes on)
    compute_s: float  # stage compute, slowdown included
    encode_s: float
    started_at: float = 0.0  # time.time() as the batch's compute began (the same for every job of one batch)


@dataclass
class _Job:
    tensors: tuple[torch.Tensor, ...]
    future: asyncio.Future

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0])


class StageExecutor(Generic[Encoded]):
    """Micro-batching front of a :class:`~splitexit.model.stages.Stage`; one worker thread does the math.

    ``encode`` turns the forwarded tensors into what the transport sends; it runs in the worker thread
    too, because codecs are CPU work. Without it the tensors themselves are forwarded (in-memory chains).
    """

    def __init__(self, stage: Stage, *, batching: BatchingSpec = BatchingSpec(), slowdown: float = 1.0,
                 encode: Callable[[tuple[torch.Tensor, ...]], Encoded] | None = None,
                 max_pending: int = DEFAULT_MAX_PENDING, name: str = "stage"):
        self.stage = stage
        self.batching = batching
        self.slowdown = slowdown
        self.encode = encode
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"splitexit-{name}")
        self._batcher: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def run(self, tensors: tuple[torch.Tensor, ...]) -> StageReply[Encoded]:
        """Queue one job (all rows of one incoming batch) and wait for its reply."""
        if self._batcher is None:
            self._batcher = asyncio.get_running_loop().create_task(self._batch_forever(), name="stage-batcher")
        job = _Job(tensors, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def _batch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            rows = jobs[0].rows
            deadline = loop.time() + self.batching.max_wait
            while rows < self.batching.max_batch:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        job = self._queue.get_nowait()
                    else:
                        async with asyncio.timeout(remaining):  # a job that came stays queued if time is up
                            job = await self._queue.get()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                jobs.append(job)
                rows += job.rows
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            try:
                replies = await loop.run_in_executor(self._pool, self._compute, jobs)
            except Exception as exc:  # noqa: BLE001 - every job of the batch gets the error, the loop lives on
                logger.exception("stage compute failed for a batch of %d rows", rows)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, reply in zip(jobs, replies):
                if not job.future.done():
                    job.future.set_result(reply)

    def _compute(self, jobs: list[_Job]) -> list[StageReply[Encoded]]:
        """Worker thread: one stage run over the concatenated jobs, then split back per job."""
        with TRACE_GUARD.shared():  # not while this process traces a model; the wait is not compute
            started_at, started = time.time(), time.perf_counter()
            inputs = jobs[0].tensors if len(jobs) == 1 else \
                tuple(torch.cat(parts) for parts in zip(*(j.tensors for j in jobs)))
            with torch.inference_mode():
                out = self.stage.run(inputs)
            compute = time.perf_counter() - started
        if self.slowdown > 1:
            time.sleep(compute * (self.slowdown - 1))
            compute *= self.slowdown
        offsets = torch.tensor([0] + [j.rows for j in jobs]).cumsum(0)
        answer_job = torch.bucketize(out.rows, offsets[1:], right=True)
        forward_job = torch.bucketize(out.forward_rows, offsets[1:], right=True)
        replies: list[StageReply[Encoded]] = []
        for index in range(len(jobs)):
            base = int(offsets[index])
            mine = (answer_job == index).nonzero().squeeze(1).tolist()
            answers = [Answer(int(out.rows[i]) - base, int(out.exit[i]), int(out.prediction[i]),
                              float(out.confidence[i]), out.logits[i].tolist()) for i in mine]
            going = (forward_job == index).nonzero().squeeze(1)
            positions = (out.forward_rows[going] - base).tolist()
            encode_started = time.perf_counter()
            forward: Encoded | None = None
            if positions:
                rows_going = tuple(t.index_select(0, going) for t in out.forward)
                # without an encoder the tensors themselves go on (Encoded is then the tensors' tuple)
                forward = self.encode(rows_going) if self.encode is not None else cast(Encoded, rows_going)
            replies.append(StageReply(answers, positions, forward, compute_s=compute,
                                      encode_s=time.perf_counter() - encode_started, started_at=started_at))
        return replies
