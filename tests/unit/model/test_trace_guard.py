"""Tracing a model while another thread computes a stage: neither sees the other (torch.fx patches globally)."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from splitexit import EarlyExitNet, ModelSource, build_model
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.model.graph import trace_model
from splitexit.model.trace_guard import SharedExclusiveLock
from splitexit.runtime.executor import StageExecutor


def test_stages_keep_computing_while_the_process_traces_models() -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn")).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = net.stage(MODEL_INPUT, MODEL_OUTPUT).run((net._prepare(x),)).prediction

    async def compute_while_tracing() -> int:
        executor = StageExecutor(net.stage(MODEL_INPUT, MODEL_OUTPUT))
        tracing = asyncio.get_running_loop().run_in_executor(
            None, lambda: [trace_model(build_model("mobilenet_v3_small", 10), torch.zeros(1, 3, 32, 32))
                           for _ in range(3)])
        runs = 0
        try:
            while not tracing.done():
                reply = await executor.run((net._prepare(x),))
                assert [a.prediction for a in reply.answers] == expected.tolist()
                runs += 1
            await tracing
        finally:
            await executor.close()
        return runs

    assert asyncio.run(compute_while_tracing()) > 0


def test_exclusive_waits_for_shared_holders_and_goes_before_new_ones() -> None:
    lock = SharedExclusiveLock()
    events: list[str] = []

    def hold_exclusive() -> None:
        with lock.exclusive():
            events.append("exclusive")

    def take_shared() -> None:
        with lock.shared():
            events.append("shared")

    writer, reader = threading.Thread(target=hold_exclusive), threading.Thread(target=take_shared)
    with lock.shared():
        writer.start()
        time.sleep(0.05)
        assert events == [], "exclusive must wait while a shared holder runs"
        reader.start()
        time.sleep(0.05)
        assert events == [], "a new shared holder queues behind the waiting exclusive one"
    writer.join(2)
    reader.join(2)
    assert events == ["exclusive", "shared"]
