"""The stage executor batches what is queued: a lone job runs at once, jobs queued behind a busy stage run
together, and no batch grows past max_batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from splitexit import EarlyExitNet, build_model
from splitexit.config import BatchingSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.runtime.executor import StageExecutor, StageReply


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    return EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8)).eval()


def rows(net: EarlyExitNet, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (net._prepare(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))),)


async def when_taken(executor: StageExecutor) -> None:
    """Until the stage's thread has taken every queued job (it is computing the last one)."""
    while executor.queued:
        await asyncio.sleep(0.001)


def test_a_lone_job_runs_at_once_without_waiting_for_company(net: EarlyExitNet) -> None:
    """max_wait is a minute: a job that found the stage idle and waited for company would time out here."""
    stage = net.stage(MODEL_INPUT, MODEL_OUTPUT)
    x = rows(net, 1, 1)

    async def run() -> StageReply:
        executor = StageExecutor(stage, batching=BatchingSpec(max_batch=8, max_wait=60.0))
        try:
            async with asyncio.timeout(20):
                return await executor.run(x)
        finally:
            await executor.close()

    reply = asyncio.run(run())
    assert [a.prediction for a in reply.answers] == net.infer(x[0]).prediction.tolist()


def test_jobs_queued_behind_a_busy_stage_run_together_within_max_batch(net: EarlyExitNet) -> None:
    stage = net.stage(MODEL_INPUT, MODEL_OUTPUT)

    async def run() -> list[StageReply]:
        # slowdown 200: the first job computes for tens of milliseconds while the others queue up behind it
        executor = StageExecutor(stage, batching=BatchingSpec(max_batch=4, max_wait=0.01), slowdown=200)
        try:
            first = asyncio.ensure_future(executor.run(rows(net, 1, 1)))
            await asyncio.sleep(0)
            await when_taken(executor)
            queued = [asyncio.ensure_future(executor.run(rows(net, n, seed))) for n, seed in ((1, 2), (2, 3), (3, 4))]
            return [await first, *await asyncio.gather(*queued)]
        finally:
            await executor.close()

    first, one, two, three = asyncio.run(run())
    assert one.started_at == two.started_at != first.started_at, "the two queued jobs that fit ran as one batch"
    assert three.started_at not in (first.started_at, one.started_at), "3 more rows did not fit in max_batch 4"
    for reply, n in ((one, 1), (two, 2), (three, 3)):
        assert sorted(a.position for a in reply.answers) == list(range(n)), "each job gets its own rows back"
