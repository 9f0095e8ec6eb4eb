"""Every request ends by its deadline: a worker whose stage stalls while its Health still answers, and a
worker frozen with SIGSTOP, each used to hold a request for 30-40 s past a 2 s ``retry.timeout``.

Real worker processes (LocalCluster), the edge in this process. A request the stalled worker holds must end
with ``deadline_exceeded`` soon after ``retry.timeout``. While the worker is frozen its Health goes quiet
too, so the edge may route around it (and compute the whole model itself): each request must then be
answered correctly or fail, either way by its deadline; once the worker runs again, it answers again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from splitexit.app.run import ensure_cluster_token
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import LocalCluster
from splitexit.runtime.records import RequestRecord
from support import digits_net, free_port

pytestmark = pytest.mark.slow

TIMEOUT = 2.0
#: How far past the timeout a request may end and still count as ending "by its deadline". Loose on purpose:
#: on a loaded 2-core machine the event loop can lag; what this catches is a request held for many seconds.
SLACK = 1.0
#: A slowdown that turns the worker's sub-millisecond stage into one that takes far longer than the timeout.
STALL = 200_000.0
#: Seconds the frozen-then-thawed worker has to answer again (its lease, probe and re-plan included).
RECOVERY = 30.0


def write_cluster(root: Path, *, slowdown: float = 1.0) -> Path:
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}", "slowdown": slowdown}],
        "retry": {"first_wait": "20ms", "max_wait": "200ms", "timeout": f"{TIMEOUT}s", "attempt_timeout": "500ms"}}))
    ensure_cluster_token(path)  # as `splitexit up` does: nodes refuse to serve without a token
    return path


def ended_by_its_deadline(record: RequestRecord) -> bool:
    return record.error is not None and TIMEOUT * 1e3 <= record.latency_ms <= (TIMEOUT + SLACK) * 1e3


def test_a_stalled_stage_ends_the_request_at_its_deadline(tmp_path: Path) -> None:
    net = digits_net(exit_quantile=1.0)  # nothing exits early: every request needs the worker
    cluster_file = write_cluster(tmp_path, slowdown=STALL)

    async def main() -> list[RequestRecord]:
        entry = Entry(net, load_cluster(cluster_file))
        await entry.start()
        try:
            x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
            return [await asyncio.wait_for(entry.infer(x[i], index=i), TIMEOUT * 10) for i in range(2)]
        finally:
            await entry.close()

    with LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=tmp_path, cache_root=tmp_path / "stages"):
        records = asyncio.run(main())
    for record in records:
        assert ended_by_its_deadline(record), f"{record.error} after {record.latency_ms:.0f} ms"
        assert record.error is not None and record.error.startswith("deadline_exceeded") and record.attempts >= 2


def test_a_frozen_worker_ends_requests_at_their_deadline_and_serves_again_once_thawed(tmp_path: Path) -> None:
    net = digits_net(exit_quantile=1.0)
    cluster_file = write_cluster(tmp_path)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = net.infer(x).prediction.tolist()

    async def main(pid: int) -> tuple[RequestRecord, list[RequestRecord], RequestRecord]:
        entry = Entry(net, load_cluster(cluster_file))
        await entry.start()
        try:
            before = await entry.infer(x[0], index=0)
            os.kill(pid, signal.SIGSTOP)
            try:
                frozen = [await asyncio.wait_for(entry.infer(x[i], index=i), TIMEOUT * 10) for i in (1, 2)]
            finally:
                os.kill(pid, signal.SIGCONT)
            thawed_at = time.monotonic()
            while True:  # the worker may have been left out while frozen: it is back within RECOVERY
                after = await entry.infer(x[3], index=3)
                if after.node == "cloud1" or time.monotonic() - thawed_at > RECOVERY:
                    return before, frozen, after
                await asyncio.sleep(0.1)
        finally:
            await entry.close()

    with LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=tmp_path,
                      cache_root=tmp_path / "stages") as local:
        before, frozen, after = asyncio.run(main(local.processes["cloud1"].pid))
    assert before.error is None and before.prediction == expected[0]
    for record, want in zip(frozen, expected[1:3]):
        assert record.latency_ms <= (TIMEOUT + SLACK) * 1e3, f"{record.error} after {record.latency_ms:.0f} ms"
        assert record.prediction == want if record.error is None else ended_by_its_deadline(record)
    assert after.error is None and after.prediction == expected[3], f"not answered once thawed: {after.error}"
    assert after.node == "cloud1", "the thawed worker serves again"
