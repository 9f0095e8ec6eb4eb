"""A lone request waits for nothing: one request at a time through a 3-node chain (cloud1 and cloud2 as node
processes, the edge here), with the default batching (``max_batch: 8, max_wait: 2ms``) against no batching
at all (``max_batch: 1``), side by side in alternating rounds.

Before a stage that is idle ran at once (before 2026-12-03), every stage made a lone request wait
``max_wait`` for company that could not come: 3 stages x 2 ms. Now only a busy stage waits (see
``src/splitexit/runtime/executor.py``), so the ratio should be ~1.0.

Run ``.venv/bin/python bench/lone_request.py`` (``--quick``: fewer requests and rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import TensorDataset

from local_nodes import start_local_cluster
from splitexit.config import ClusterSpec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import free_port
from splitexit.runtime.security import write_token
from transport_chain import NODE_NAMES, digits_package

SETTINGS = {"max_batch 8, max_wait 2ms (default)": {"max_batch": 8, "max_wait": "2ms"},
            "max_batch 1 (nothing to wait for)": {"max_batch": 1, "max_wait": "0s"}}


def write_cluster(directory: Path, package: Path, batching: dict) -> tuple[Path, ClusterSpec]:
    if not (directory / "cluster.token").exists():
        write_token(directory / "cluster.token")
    nodes = [{"name": "edge", "role": "edge"}] + [{"name": name, "address": f"127.0.0.1:{free_port()}"}
                                                   for name in NODE_NAMES[1:]]
    spec = {"package": str(package.resolve()), "nodes": nodes, "batching": batching, "window": 1,
            "links": [{"from": a, "to": b, "codec": "raw"} for a, b in zip(NODE_NAMES, NODE_NAMES[1:])]}
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, load_cluster(path)


def latencies_ms(net: object, package: Path, batching: dict, inputs: TensorDataset, workdir: Path) -> list[float]:
    """Per-request latency of one request at a time (the first 20 are a warm-up)."""
    local, cluster, _ = start_local_cluster(lambda: write_cluster(workdir, package, batching), workdir)
    try:
        async def go() -> list[float]:
            entry = Entry(net, cluster)  # type: ignore[arg-type]
            try:
                await entry.start()
                result = await entry.run(inputs)
            finally:
                await entry.close()
            assert not [r.error for r in result.records if r.error]
            return [r.latency_ms for r in result.records[20:]]
        return asyncio.run(go())
    finally:
        local.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    args = parser.parse_args(argv)
    requests, rounds = (120, 2) if args.quick else (400, 4)
    torch.set_num_threads(1)
    print(f"# bench/lone_request.py, {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}: "
          f"{platform.platform()}, {os.cpu_count()} CPUs; digits_cnn, 3 nodes, window 1, raw codec, "
          f"{requests} requests x {rounds} rounds")
    generator = torch.Generator().manual_seed(1)
    inputs = TensorDataset(torch.randn(requests + 20, 1, 8, 8, generator=generator),
                           torch.randint(0, 10, (requests + 20,), generator=generator))
    medians: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-") as tmp:
        package = Path(tmp) / "digits_pkg"
        net = digits_package(package)
        for _ in range(rounds):
            for name, batching in SETTINGS.items():
                medians[name].append(statistics.median(latencies_ms(net, package, batching, inputs, Path(tmp))))
    baseline = statistics.median(medians["max_batch 1 (nothing to wait for)"])
    for name, values in medians.items():
        median = statistics.median(values)
        print(f"  {name:>38}: median {median:6.2f} ms per request ({', '.join(f'{v:.2f}' for v in values)}), "
              f"{median / baseline:.2f}x no batching")
    return 0


if __name__ == "__main__":
    sys.exit(main())
