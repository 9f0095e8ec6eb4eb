"""The in-memory twin of a cluster: Hops chained in one process give exactly net.infer's answers."""

from __future__ import annotations

import asyncio

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, ExitPolicy, build_model
from splitexit.config import BatchingSpec, ClusterSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.runtime.executor import StageExecutor
from splitexit.runtime.hop import Hop, RowError, RowResult
from splitexit.runtime.placement import default_placement


def cluster(workers: int) -> ClusterSpec:
    nodes = [{"name": "edge", "role": "edge"}] + [
        {"name": f"cloud{i}", "address": f"127.0.0.1:{50061 + i}"} for i in range(1, workers + 1)]
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump({"nodes": nodes})))


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8)).eval()
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        scores = [torch.softmax(o / 0.2, 1).amax(1) for o in net(x)[:-1]]
    net.set_policy(ExitPolicy(temperatures=(0.2,) * net.num_exits,
                              thresholds=tuple(float(s.median()) for s in scores)))
    return net


def build_chain(net: EarlyExitNet, workers: int, batching: BatchingSpec) -> Hop:
    placement = default_placement(net, cluster(workers))
    hop = None
    for stage in reversed(placement.stages):
        hop = Hop(stage.nodes[0], StageExecutor(net.stage(stage.start, stage.end), batching=batching), hop)
    return hop  # type: ignore[return-value]


async def run_chain(net: EarlyExitNet, x: torch.Tensor, workers: int, max_batch: int) -> list:
    first = build_chain(net, workers, BatchingSpec(max_batch=max_batch, max_wait=0.001))
    try:
        async def one(i: int):
            (future,) = await first.send([i], (x[i:i + 1],), [])
            return await future
        return await asyncio.gather(*(one(i) for i in range(len(x))))
    finally:
        await first.close()


@pytest.mark.parametrize("workers, max_batch", [(2, 1), (2, 8), (3, 4)])
def test_chain_answers_like_net_infer(net: EarlyExitNet, workers: int, max_batch: int) -> None:
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = net.infer(x)
    outcomes = asyncio.run(run_chain(net, x, workers, max_batch))
    assert all(isinstance(o, RowResult) for o in outcomes), [o for o in outcomes if isinstance(o, RowError)][:3]
    assert [o.request_id for o in outcomes] == list(range(len(x)))
    assert [o.prediction for o in outcomes] == expected.prediction.tolist()
    assert [o.exit for o in outcomes] == expected.exit.tolist()
    assert len({o.exit for o in outcomes}) > 1, "the policy should make rows leave at different exits"
    nodes = {o.exit: o.node for o in outcomes}
    assert len(set(nodes.values())) > 1, "answers should come from several nodes"


def test_placement_spreads_exits_one_per_node(net: EarlyExitNet) -> None:
    placement = default_placement(net, cluster(2))
    assert [s.end for s in placement.stages[:-1]] == [c.id for c in net.exit_cuts]
    assert placement.stages[0].start is MODEL_INPUT and placement.stages[-1].end is MODEL_OUTPUT
    four = default_placement(net, cluster(3))
    assert len(four.stages) == 4 and len({s.end for s in four.stages}) == 4


def test_calls_batched_together_go_on_as_one_batch_each_row_keeping_its_own_trace(net: EarlyExitNet) -> None:
    """Calls of 1-4 rows, all at once, max_batch 4: no stage runs more than 4 rows, the rows of several calls
    that one stage ran together reach the next stage as one batch, and every answer still carries its own
    call's first stamp."""
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = net.infer(x)
    sizes = [1, 3, 2, 1, 4, 1, 1, 2, 3, 2, 1, 3]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    async def run() -> list[list[RowResult | RowError]]:
        first = build_chain(net, 2, BatchingSpec(max_batch=4, max_wait=0.005))
        try:
            async def call(start: int, n: int) -> list[RowResult | RowError]:
                futures = await first.send(list(range(start, start + n)), (x[start:start + n],), [])
                return list(await asyncio.gather(*futures))
            return list(await asyncio.gather(*(call(s, n) for s, n in zip(starts, sizes))))
        finally:
            await first.close()

    calls = asyncio.run(run())
    outcomes = [o for call in calls for o in call]
    assert all(isinstance(o, RowResult) for o in outcomes), [o for o in outcomes if isinstance(o, RowError)][:3]
    results = [o for o in outcomes if isinstance(o, RowResult)]
    assert [o.prediction for o in results] == expected.prediction.tolist()
    assert [o.exit for o in results] == expected.exit.tolist()
    # rows that share a node's compute_start were one batch there
    batches: dict[tuple[str, float], set[int]] = {}
    for call in calls:
        for outcome in call:
            assert isinstance(outcome, RowResult)
            for node, event, at in outcome.trace:
                if event == "compute_start":
                    batches.setdefault((node, at), set()).add(outcome.request_id)
    assert max(len(rows) for rows in batches.values()) <= 4
    first_node = outcomes[0].trace[0][0]
    call_of = {request_id: index for index, (s, n) in enumerate(zip(starts, sizes)) for request_id in range(s, s + n)}
    merged = [rows for (node, _), rows in batches.items() if node != first_node and len({call_of[r] for r in rows}) > 1]
    assert merged, "rows of several calls should have gone on together"
    leading = [{o.trace[0] for o in call if isinstance(o, RowResult)} for call in calls]
    assert all(len(stamps) == 1 for stamps in leading), "the rows of one call share its first stamp"
    assert len({next(iter(stamps)) for stamps in leading}) == len(calls), "each call keeps its own first stamp"
