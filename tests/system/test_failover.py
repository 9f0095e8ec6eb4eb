"""Nodes come and go under load, with a real etcd: no request is lost or answered twice.

An edge (this process) and three worker processes: w1 alone in tier 1, w2 and w3 replicas of tier 2. While
2000 inputs stream through, one worker is SIGKILLed; it is restarted a little later, and a fourth worker
(not in the cluster file; admitted because TLS proves its name) joins tier 2. Every input must get exactly
one answer, equal to the model's own, the first resubmitted request must be answered within the lease
TTL + 2 s of the kill, and the restarted and the new worker must take load.
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
from torch.utils.data import TensorDataset

from splitexit import EarlyExitNet
from splitexit.app.run import ensure_cluster_token
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.etcd_server import DevEtcd
from splitexit.control.local_cluster import LocalCluster
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.security import init_ca, issue_certificate
from support import digits_net, free_port

pytestmark = pytest.mark.slow

REQUESTS = 6000  # at most (60 s): the churn test stops sending AFTER_REJOIN s after the restarted worker is up
TTL = 2.0
RATE = 100  # inputs per second
AFTER_REJOIN = 3.0  # a restart takes 13-17 s here when idle, more under load: the run waits for it
JOIN_AT, KILL_AT = 1.0, 4.0  # seconds into the run


def write_cluster(path: Path, etcd: DevEtcd) -> Path:
    """The chain, with TLS: w4, which the file does not name, may join only by proving its name."""
    pki = path.parent / "pki"
    init_ca(pki)
    for name in ("edge", "w1", "w2", "w3", "w4"):
        issue_certificate(pki, name)
    link = {"latency": "20ms"}  # paces the run so that the kill, the restart and the join all happen mid-run
    path.write_text(yaml.safe_dump({
        "registry": {"etcd": [etcd.endpoint], "ttl": TTL},
        "security": {"tls": "pki"},
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "w1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "w2", "address": f"127.0.0.1:{free_port()}", "tier": 2},
                  {"name": "w3", "address": f"127.0.0.1:{free_port()}", "tier": 2}],
        "links": [{"from": "edge", "to": "w1", **link}, {"from": "w1", "to": "w2", **link},
                  {"from": "w1", "to": "w3", **link},
                  {"from": "edge", "to": "w2", **link}, {"from": "edge", "to": "w3", **link}],  # while w1 is down
        "batching": {"max_batch": 8, "max_wait": "1ms"},
        "window": 16}))
    ensure_cluster_token(path)
    return path


async def churn(net: EarlyExitNet, cluster_file: Path, local: LocalCluster, victim: str,
                dataset: TensorDataset) -> tuple[list[RequestRecord], list[tuple[str, str, int]], float, float]:
    """Send the dataset at RATE inputs/s until AFTER_REJOIN s after both workers are up again; start w4 and
    kill ``victim`` mid-run, then restart it. Returns the records (of the inputs sent, in order), the stage
    shipments, the time of the kill and the time both workers were up again."""
    entry = Entry(net, load_cluster(cluster_file))
    killed_at = rejoined_at = 0.0

    async def disturb() -> None:
        nonlocal killed_at, rejoined_at
        await asyncio.sleep(JOIN_AT)
        local.launch("w4", "--address", f"127.0.0.1:{free_port()}", "--tier", "2")
        await asyncio.sleep(KILL_AT - JOIN_AT)
        os.kill(local.processes[victim].pid, signal.SIGKILL)
        killed_at = time.time()
        await asyncio.to_thread(local.processes[victim].wait)
        local.launch(victim)  # same name, same address: it rejoins with its cached stage
        await asyncio.gather(asyncio.to_thread(local.wait_ready, victim), asyncio.to_thread(local.wait_ready, "w4"))
        rejoined_at = time.time()

    await entry.start()
    try:
        disturber = asyncio.get_running_loop().create_task(disturb())
        requests = []
        for index, (x, label) in enumerate(dataset):  # paced, so the run outlasts the kill, restart and join
            if rejoined_at and time.time() > rejoined_at + AFTER_REJOIN:
                break
            requests.append(asyncio.get_running_loop().create_task(entry.infer(x, index=index, label=int(label))))
            await asyncio.sleep(1 / RATE)
        records = await asyncio.gather(*requests)
        await disturber
        return records, list(entry.coordinator.shipments), killed_at, rejoined_at  # type: ignore[union-attr]
    finally:
        await entry.close()


@pytest.mark.parametrize("victim", ["w1", "w2"])
def test_sigkill_of_a_worker_loses_nothing(victim: str, tmp_path: Path) -> None:
    net = digits_net(exit_quantile=0.9)
    x = torch.randn(REQUESTS, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    expected = net.infer(x).prediction.tolist()
    dataset = TensorDataset(x, torch.tensor(expected))
    with DevEtcd(tmp_path / "etcd") as etcd:
        cluster_file = write_cluster(tmp_path / "cluster.yaml", etcd)
        with LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=tmp_path,
                          cache_root=tmp_path / "stages") as local:
            records, shipments, killed_at, rejoined_at = asyncio.run(churn(net, cluster_file, local, victim,
                                                                           dataset))
    assert rejoined_at, f"the restart took longer than the {REQUESTS / RATE:.0f} s the run may last"
    records = sorted(records, key=lambda r: r.index)
    assert [r.index for r in records] == list(range(len(records))), "one record per input sent"
    assert len({r.request_id for r in records}) == len(records), "no request answered twice"
    assert [r.error for r in records if r.error] == []
    assert [r.prediction for r in records] == expected[:len(records)], "answers must equal the model's own"
    resubmitted = [r for r in records if r.attempts > 1]
    assert resubmitted, "the kill should have caught requests in flight"
    first = min(r.finished for r in resubmitted)
    assert first - killed_at <= TTL + 2, f"first resubmitted answer {first - killed_at:.2f} s after the kill"
    late = {r.node for r in records if r.finished > rejoined_at + 1}
    assert late, "the run should go on well after the restart"
    assert victim in late, "the restarted worker must take load again"
    assert "w4" in late, "the worker that joined mid-run must take load"
    shipped = [(node, sha) for node, sha, _ in shipments]
    assert len(shipped) == len(set(shipped)), f"a stage file crossed the network twice: {shipped}"
    assert {node for node, _ in shipped} == {"w1", "w2", "w3", "w4"}


def test_an_etcd_restart_mid_run_loses_nothing(tmp_path: Path) -> None:
    net = digits_net(exit_quantile=0.9)
    x = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    expected = net.infer(x).prediction.tolist()

    async def run(cluster_file: Path, etcd: DevEtcd) -> list[RequestRecord]:
        entry = Entry(net, load_cluster(cluster_file))
        await entry.start()
        try:
            requests = []
            for index in range(len(x)):
                requests.append(asyncio.get_running_loop().create_task(entry.infer(x[index], index=index)))
                await asyncio.sleep(1 / RATE)
                if index == 150:
                    await asyncio.to_thread(etcd.restart)
            return await asyncio.gather(*requests)
        finally:
            await entry.close()

    with DevEtcd(tmp_path / "etcd") as etcd:
        cluster_file = write_cluster(tmp_path / "cluster.yaml", etcd)
        with LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=tmp_path,
                          cache_root=tmp_path / "stages") as local:
            records = asyncio.run(run(cluster_file, etcd))
            assert all(p.poll() is None for p in local.processes.values()), "a node died with etcd"
    assert [r.error for r in records if r.error] == []
    assert [r.prediction for r in sorted(records, key=lambda r: r.index)] == expected


def test_unreachable_etcd_at_start_is_a_clear_error(tmp_path: Path) -> None:
    from splitexit.errors import RegistryUnavailableError

    port = free_port()
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"registry": {"etcd": [f"127.0.0.1:{port}"]},
                                            "nodes": [{"name": "edge", "role": "edge"},
                                                      {"name": "w1", "address": f"127.0.0.1:{free_port()}"}]}))
    entry = Entry(digits_net(exit_quantile=0.9), load_cluster(cluster_file))
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match=f"127.0.0.1:{port}"):
        asyncio.run(entry.start())
    assert time.monotonic() - started < 15
