"""Graceful fallback at the edge (issue 14): requests the chain cannot answer in time (here: a link that takes
3 s each way) are answered at the edge before their timeout, flagged with why; `exit` answers from the edge's
deepest exit, `local` runs the whole cascade; without a fallback they fail at the timeout, as before. (A
worker that dies is not the case: the coordinator re-places its stage, and nothing needs a fallback.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from splitexit import EarlyExitNet
from splitexit.config import ClusterSpec
from splitexit.control.edge import Entry
from splitexit.model.heads import confidence_function
from splitexit.runtime.records import RequestRecord
from support import digits_net, free_port, start_nodes, stop_nodes

EDGE_ENDS_AT = 9  # digits_cnn's exits sit at cuts 6 and 9: the edge's stage holds both
TIMEOUT = 1.5


def cluster(fallback: str) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge", "ends_at": EDGE_ENDS_AT},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "codec": "raw", "latency": "3s"}],
        "retry": {"timeout": f"{TIMEOUT}s", "attempt_timeout": "0.5s"}, "fallback": fallback})


def serve(net: EarlyExitNet, spec: ClusterSpec, x: torch.Tensor, tmp_path: Path) -> list[RequestRecord]:
    async def go() -> list[RequestRecord]:
        nodes = await start_nodes(spec, tmp_path)
        entry = Entry(net, spec, window=len(x))
        try:
            await entry.start()
            return (await entry.run(TensorDataset(x))).records
        finally:
            await entry.close()
            await stop_nodes(nodes)
    return asyncio.run(go())


def deepest_edge_exit(net: EarlyExitNet, x: torch.Tensor) -> list[tuple[int, int]]:
    """(exit, prediction) per row when exit 1 (the deepest in the edge's stage) must answer what exit 0 did
    not: computed from every exit's logits, apart from the stage code."""
    policy, score = net.policy, confidence_function(net.policy.confidence)
    with torch.no_grad():
        logits = net(x)
    first = score(logits[0] / policy.temperatures[0]) >= policy.thresholds[0]
    return [(0, int(logits[0][i].argmax())) if first[i] else (1, int(logits[1][i].argmax())) for i in range(len(x))]


@pytest.mark.parametrize("mode", ["local", "exit"])
def test_what_the_chain_cannot_answer_in_time_the_edge_answers_itself_and_says_why(mode: str,
                                                                                   tmp_path: Path) -> None:
    net = digits_net()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    records = serve(net, cluster(mode), x, tmp_path)
    assert len(records) == len(x) and all(r.error is None for r in records)
    answered_at_edge = {r.index for r in records if r.node == "edge"}
    fell_back = [r for r in records if r.fallback]
    assert fell_back and {r.index for r in fell_back} <= answered_at_edge
    assert all(r.fallback_reason and ("attempt_expired" in r.fallback_reason or "deadline" in r.fallback_reason)
               for r in fell_back), [r.fallback_reason for r in fell_back]
    assert all(r.latency_ms < TIMEOUT * 1e3 + 500 for r in fell_back), "answered before the timeout ran out"
    expected = net.infer(x)
    deepest = deepest_edge_exit(net, x)
    for record in fell_back:
        if mode == "local":
            assert (record.exit, record.prediction) == (int(expected.exit[record.index]),
                                                        int(expected.prediction[record.index]))
        else:
            assert (record.exit, record.prediction) == deepest[record.index]
    # the rest left at exit 0 or 1 on the edge's own stage, within its plan, before anything was sent
    assert all(r.exit in (0, 1) for r in records if not r.fallback)


def test_without_a_fallback_the_requests_fail_at_the_timeout(tmp_path: Path) -> None:
    net = digits_net()
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    records = serve(net, cluster("none"), x, tmp_path)
    failed = [r for r in records if r.error is not None]
    assert failed and not any(r.fallback for r in records)
    assert all("deadline_exceeded" in str(r.error) or "attempt_expired" in str(r.error) for r in failed)


def busy_cluster(fallback: str) -> ClusterSpec:
    """The edge forwards its inputs to one slow worker that takes one batch of one row at a time."""
    return ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge", "ends_at": "input"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}", "slowdown": 200}],
        "batching": {"max_batch": 1}, "data_plane": {"credits": 1}, "fallback": fallback,
        "retry": {"timeout": "60s", "attempt_timeout": "30s"}})  # the worker's first batch takes a while


@pytest.mark.parametrize("mode", ["exit", "none"])
def test_a_full_worker_is_not_sent_more_the_edge_answers_at_once_instead(mode: str, tmp_path: Path) -> None:
    """Admission control: with a fallback, rows for which the worker has granted no credit are answered
    ``overloaded`` at the edge (never sent, not queued), at once; without one they wait for credit."""
    net = digits_net()
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    records = serve(net, busy_cluster(mode), x, tmp_path)
    assert len(records) == len(x) and all(r.error is None for r in records)
    shed = [r for r in records if r.fallback]
    by_chain = [r for r in records if not r.fallback]
    expected = net.infer(x)
    assert all((r.exit, r.prediction) == (int(expected.exit[r.index]), int(expected.prediction[r.index]))
               for r in by_chain)
    if mode == "none":
        assert not shed and all(r.node == "cloud1" for r in records), "every row waited for its turn"
        return
    assert shed and by_chain, "the worker answered what it had room for, the edge the rest"
    assert all(str(r.fallback_reason).startswith("overloaded: cloud1 has every batch") for r in shed)
    assert all(r.node == "edge" and r.exit == 0 for r in shed), "from the first exit: the edge's stage holds none"
    assert max(r.finished for r in shed) < min(r.finished for r in by_chain), "shed at once, not after waiting"
