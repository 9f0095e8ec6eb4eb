"""On a machine with CUDA (`make test-gpu`): a node computing on the GPU, in fp32 and in bf16, with and without
pinned receive buffers, answers as the CPU does; what it forwards is CPU float32; pinned buffers are
page-locked and reach the GPU intact. Skipped, with the reason, where there is no CUDA."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from splitexit.config import ClusterSpec
from splitexit.control.edge import Entry
from splitexit.runtime.devices import choose_device, to_device
from support import digits_net, free_port, start_nodes, stop_nodes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA on this machine")]


@pytest.mark.parametrize("dtype, pin_memory", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_a_chain_on_the_gpu_answers_as_the_cpu(dtype: str, pin_memory: bool, tmp_path: Path) -> None:
    net = digits_net()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = net.infer(x)
    cluster = ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge", "device": "cpu"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}", "device": "cuda", "dtype": dtype,
                   "pin_memory": pin_memory},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}", "device": "cuda:0", "dtype": dtype}]})

    async def go() -> list[int | None]:
        nodes = await start_nodes(cluster, tmp_path)
        entry = Entry(net, cluster)
        try:
            await entry.start()
            health = await nodes[0].health()
            assert health.device == ("cuda:0" if dtype == "fp32" else "cuda:0/bf16")
            result = await entry.run(TensorDataset(x))
            return [r.prediction for r in sorted(result.records, key=lambda r: r.index)]
        finally:
            await entry.close()
            await stop_nodes(nodes)

    answers = asyncio.run(go())
    agree = sum(a == b for a, b in zip(answers, expected.prediction.tolist()))
    assert agree == len(x) if dtype == "fp32" else agree >= 0.95 * len(x), (agree, len(x))


def test_pinned_payload_buffers_are_page_locked_and_reach_the_gpu_intact() -> None:
    compute = choose_device("cuda", "fp32", member="node a", pin_memory=True)
    assert compute.payload_buffer is not None
    view = compute.payload_buffer(1 << 20)
    received = torch.frombuffer(view, dtype=torch.float32)  # as the decoder wraps a raw payload
    received.copy_(torch.arange(received.numel(), dtype=torch.float32))
    unpinned = torch.randn(3, 5)
    assert received.is_pinned() and not unpinned.is_pinned()
    on_gpu, staged = to_device((received, unpinned), compute)
    torch.cuda.synchronize()
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), received)
    assert torch.equal(staged.cpu(), unpinned)
