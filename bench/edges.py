"""Benchmark: many edges sharing one replicated tier: throughput against the tier's capacity, latency per
edge, fairness across edges, and what answers at twice the tier's capacity.

Two worker processes on loopback are the replicas of the one cloud tier; each runs the whole model (the
edges forward their inputs: `ends_at: input`), with `slowdown` so that the tier, not this box's two
cores, is the bottleneck, and `max_batch` 4 so that rows of several edges are batched together (their
plans coincide, so the workers serve them as one plan). The edges are `Entry` objects in this process
(one event loop; each with its own embedded registry, prober and coordinator, as each `splitexit run
--edge` has), each sending at a fixed rate (open loop), for 1, 2, 4, 8 and 16 edges:

* **capacity**: one edge offered far more than the tier can do: its answers/s is the tier's capacity C;
* **saturated**: N edges offered 1.2 C in all: aggregate answers/s over C, and Jain's index of the edges'
  answers/s ((sum x)^2 / (n sum x^2): 1 is perfectly even);
* **70% load**: N edges offered 0.7 C in all: p50 and p99 latency over every edge's requests, the worst
  edge's p99, and p99 / p50;
* **2x overload** with `fallback: exit` and `retry.timeout` 2 s: the share of answers that came from the
  fallback (a full worker's rows are answered at the edge at once, `overloaded`; the rest near the
  timeout), requests lost (must be 0), the smallest share of its requests any edge got answered by the
  chain, and the workers' resident memory after the run against before it.

Before each load the workers finish what the last one left queued (their Health says nothing in flight).

Absolute rates on this shared 2-core box are noise; the ratios within one run are the result. Run
``.venv/bin/python bench/edges.py`` (``make bench``); ``--edges 1,2,4`` picks counts, ``--json PATH`` keeps
the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model
from splitexit.config import ClusterSpec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import LocalCluster, free_port
from splitexit.runtime.control_client import NodeControl
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.security import write_token

#: How much slower than measured the workers compute: makes the tier the bottleneck.
SLOWDOWN = 16
#: Seconds each load runs (after the edges are placed).
DURATION = 8.0
#: Offered load as a fraction of the tier's capacity, per measurement.
SATURATED, MODERATE, OVERLOAD = 1.2, 0.7, 2.0
EDGE_COUNTS = (1, 2, 4, 8, 16)
#: retry.timeout at 2x overload: the chain gets 90% of it, then the edge answers itself.
OVERLOAD_TIMEOUT = 2.0
#: Seconds the workers get to finish what an earlier load left queued before the next load starts.
DRAIN_WAIT = 60.0
#: Inputs per second offered to find the tier's capacity: far beyond it.
CAPACITY_PROBE = 1500.0


def make_net() -> EarlyExitNet:
    """digits_cnn with its exits never sure (every row runs the whole model on the tier); the fallback
    answers from the first exit, at the edge."""
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    net.set_policy(ExitPolicy(temperatures=(1.0,) * net.num_exits, thresholds=(2.0,) * len(net.exit_cuts)))
    return net


def write_cluster(path: Path, edges: int) -> ClusterSpec:
    if not (path.parent / "cluster.token").exists():
        write_token(path.parent / "cluster.token")
    names = [f"edge{i:02d}" for i in range(edges)]
    workers = [{"name": "cloud1a", "address": f"127.0.0.1:{free_port()}", "slowdown": SLOWDOWN},
               {"name": "cloud1b", "address": f"127.0.0.1:{free_port()}", "slowdown": SLOWDOWN, "tier": 1}]
    path.write_text(yaml.safe_dump({
        "nodes": [*({"name": name, "role": "edge", "ends_at": "input"} for name in names), *workers],
        "links": [{"from": name, "to": worker["name"], "latency": "1ms"} for name in names for worker in workers],
        "batching": {"max_batch": 4, "max_wait": "2ms"}, "window": 64}))
    return load_cluster(path)


@dataclass(frozen=True)
class Sent:
    """One request as this bench saw it: when it was handed to the edge, and its record."""

    at: float
    record: RequestRecord

    @property
    def latency_ms(self) -> float:
        return (self.record.finished - self.at) * 1e3

    @property
    def by_chain(self) -> bool:
        return self.record.error is None and not self.record.fallback


async def offered(net: EarlyExitNet, cluster: ClusterSpec, edges: int, rate: float) -> dict[str, list[Sent]]:
    """Each of ``edges`` edges sends ``rate / edges`` inputs per second for DURATION seconds."""
    entries = [Entry(net, cluster, edge=f"edge{i:02d}") for i in range(edges)]
    try:
        await asyncio.gather(*(entry.start() for entry in entries))
        x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        per_edge = rate / edges

        async def send(entry: Entry, offset: float) -> list[Sent]:
            loop = asyncio.get_running_loop()
            sent, tasks = [], []
            start = loop.time() + offset
            for index in range(int(per_edge * DURATION)):
                await asyncio.sleep(max(0.0, start + index / per_edge - loop.time()))
                sent.append(time.time())  # latency counts from here, also the wait for a window slot
                tasks.append(loop.create_task(entry.infer(x[index % len(x)], index=index)))
            return [Sent(at, record) for at, record in zip(sent, await asyncio.gather(*tasks))]

        results = await asyncio.gather(*(send(entry, i / rate) for i, entry in enumerate(entries)))
        return {entry.name: records for entry, records in zip(entries, results)}
    finally:
        for entry in entries:
            await entry.close()


def answered_rate(runs: list[Sent]) -> float:
    """Answers per second the chain gave (not the fallback), from the first request sent to the last answer."""
    chain = [r for r in runs if r.by_chain]
    if not chain:
        return 0.0
    return len(chain) / (max(r.record.finished for r in chain) - min(r.at for r in runs))


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else float("nan")


async def drain(cluster: ClusterSpec) -> None:
    """Wait until no worker has rows in flight (what an earlier load left queued there is done)."""
    controls = [NodeControl(node, credentials=None, token=cluster.security.token, message_limit=cluster.message_limit)
                for node in cluster.workers]
    try:
        deadline = time.monotonic() + DRAIN_WAIT
        while time.monotonic() < deadline:
            healths = await asyncio.gather(*(control.health(5.0) for control in controls))
            if all(health.in_flight == 0 for health in healths):
                return
            await asyncio.sleep(0.2)
    finally:
        for control in controls:
            await control.close()


def rss_mib(local: LocalCluster) -> float:
    total = 0
    for process in local.processes.values():
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def measure(net: EarlyExitNet, cluster: ClusterSpec, local: LocalCluster, edges: int, capacity: float) -> dict:
    row: dict = {"edges": edges}
    overloaded = cluster.model_copy(update={"fallback": "exit", "retry": cluster.retry.model_copy(
        update={"timeout": OVERLOAD_TIMEOUT})})
    for load, spec in ((SATURATED, cluster), (MODERATE, cluster), (OVERLOAD, overloaded)):
        asyncio.run(drain(cluster))
        before = rss_mib(local)
        runs = asyncio.run(offered(net, spec, edges, load * capacity))
        after = rss_mib(local)
        records = [r for rs in runs.values() for r in rs]
        lost = sum(1 for r in records if r.record.error is not None)
        if load == SATURATED:
            rates = [answered_rate(rs) for rs in runs.values()]
            row |= {"throughput_per_s": sum(rates), "of_capacity": sum(rates) / capacity, "jain": jain(rates),
                    "lost_saturated": lost}
        elif load == MODERATE:
            latencies = [r.latency_ms for r in records if r.by_chain]
            p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
            worst = max(float(np.percentile([r.latency_ms for r in rs], 99)) for rs in runs.values())
            row |= {"p50_ms": p50, "p99_ms": p99, "p99_over_p50": p99 / p50, "worst_edge_p99_ms": worst,
                    "lost_moderate": lost}
        else:
            fallbacks = sum(1 for r in records if r.record.fallback)
            chain_share = min(sum(1 for r in rs if r.by_chain) / len(rs) for rs in runs.values())
            row |= {"fallback_share": fallbacks / len(records), "lost_overload": lost,
                    "min_edge_chain_share": chain_share, "rss_before_mib": before, "rss_after_mib": after}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", default=",".join(map(str, EDGE_COUNTS)), help="edge counts, comma-separated")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    net = make_net()
    rows = []
    counts = [int(n) for n in args.edges.split(",")]
    with tempfile.TemporaryDirectory(prefix="splitexit-edges-") as workdir:
        started = time.perf_counter()
        cluster_file = Path(workdir) / "cluster.yaml"
        cluster = write_cluster(cluster_file, max(counts))
        with LocalCluster(cluster_file, cluster, log_dir=Path(workdir), cache_root=Path(workdir) / "stages") as local:
            probe = asyncio.run(offered(net, cluster, 1, CAPACITY_PROBE))
            capacity = answered_rate(probe["edge00"])
            print(f"tier capacity alone (one edge offered {CAPACITY_PROBE:.0f}/s): {capacity:.0f} answers/s",
                  flush=True)
            for edges in counts:
                row = measure(net, cluster, local, edges, capacity)
                rows.append(row)
                print(f"{edges:2d} edges: saturated {row['throughput_per_s']:.0f}/s = {row['of_capacity']:.2f}x "
                      f"capacity, Jain {row['jain']:.3f}; at 70%: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} "
                      f"ms (p99/p50 {row['p99_over_p50']:.2f}, worst edge p99 {row['worst_edge_p99_ms']:.1f} ms); at "
                      f"2x: fallback {row['fallback_share']:.0%}, lost {row['lost_overload']}, every edge's chain "
                      f"share >= {row['min_edge_chain_share']:.0%}, workers {row['rss_before_mib']:.0f} -> "
                      f"{row['rss_after_mib']:.0f} MiB", flush=True)
        print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"capacity_per_s": capacity, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
