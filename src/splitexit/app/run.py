"""The distributed commands end to end (node, up, run), one function each, for the thin CLI."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from splitexit.app.plan import profile_package
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.load import load_cluster, resolve_package
from splitexit.control.edge import Entry, RunResult
from splitexit.control.local_cluster import LocalCluster, die_with_parent, free_port
from splitexit.control.replan import PlannedLayout, file_codecs
from splitexit.control.worker import serve_node
from splitexit.errors import ClusterError, DataError
from splitexit.model.cpu import apply_threads
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.package import load, read_spec
from splitexit.plan.planner import Objective
from splitexit.runtime.node import Node
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.stage_cache import default_cache_dir

__all__ = ["run_cluster", "serve", "start_cluster", "write_demo_cluster", "write_records"]


def serve(cluster_file: Path, name: str, *, address: str | None = None, tier: int | None = None,
          cache_dir: Path | None = None, port: int | None = None, parent: int | None = None) -> None:
    """Run one worker node until SIGTERM/SIGINT (or until ``parent`` dies, when given).

    A node that is not in the cluster file (one joining a running cluster) needs ``address`` and ``tier``.
    """
    if parent is not None:
        die_with_parent(parent)
    cluster = load_cluster(cluster_file)
    spec = _node_spec(cluster, cluster_file, name, address, tier)
    node = Node(cluster, name, spec=spec, cache_dir=cache_dir or default_cache_dir(name))
    asyncio.run(serve_node(node, port=port))


def _node_spec(cluster: ClusterSpec, cluster_file: Path, name: str, address: str | None, tier: int | None) -> NodeSpec:
    try:
        spec = cluster.node(name)
    except KeyError:
        if address is None or tier is None:
            raise ClusterError(f"node {name!r} is not in {cluster_file}; to join it to the cluster give --address "
                               "HOST:PORT and --tier N, or add it to the file") from None
        spec = NodeSpec(name=name, address=address, tier=tier)
    if address is not None or tier is not None:
        spec = NodeSpec.model_validate({**spec.model_dump(), **({"address": address} if address else {}),
                                        **({"tier": tier} if tier else {})})
    return spec


def start_cluster(cluster_file: Path, *, log_dir: Path | None = None, cache_root: Path | None = None,
                  verbose: bool = False) -> LocalCluster:
    """Start every worker of the file locally and wait until all are ready (the caller stops them)."""
    cluster = load_cluster(cluster_file)
    local = LocalCluster(cluster_file, cluster, log_dir=log_dir, cache_root=cache_root, verbose=verbose)
    local.start()
    return local


def run_cluster(package: Path | None, cluster_file: Path, *, data: str | None = None, split: str = "test",
                window: int | None = None, limit: int | None = None, objective: Objective | None = Objective(),
                replan: bool = True, on_record: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Be the edge: stream a dataset split through the running cluster and collect every outcome.

    With an ``objective`` the planner places the model (profiling the package first if it has no
    profile yet) and, with ``replan``, places it again when measured links make another plan better;
    with ``objective=None`` the cluster file's layout (``ends_at``, or exits spread over the tiers) is used.
    """
    cluster = load_cluster(cluster_file)
    package = resolve_package(cluster_file, cluster, package)
    spec = read_spec(package)
    net = load(package)
    apply_threads(net.cpu)
    name = data or (spec.data.dataset if spec.data else None)
    if name is None:
        raise DataError(f"{package} records no dataset; pass --data")
    dataset = split_dataset(load_dataset(name), spec.data).get(split)
    if limit is not None:
        from torch.utils.data import Subset
        dataset = Subset(dataset, range(min(limit, len(dataset))))  # type: ignore[arg-type]

    layout = None
    if objective is not None:
        profile = profile_package(package, data=data).profile
        layout = PlannedLayout(net, profile, objective, codecs=file_codecs(cluster))

    async def go() -> RunResult:
        entry = Entry(net, cluster, window=window, layout=layout, replan=replan)
        try:
            await entry.start()
            return await entry.run(dataset, on_record=on_record)
        finally:
            await entry.close()

    return asyncio.run(go())


def write_records(records: list[RequestRecord], path: Path) -> None:
    """One JSON line per input, in dataset order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in sorted(records, key=lambda r: r.index):
            handle.write(json.dumps(asdict(record)) + "\n")


#: The demo's edge, uplink, and what the uplink drops to.
DEMO_SLOWDOWN, DEMO_UPLINK, DEMO_DROPPED = 24, "50Mbit", "0.05Mbit"


def write_demo_cluster(path: Path, package: Path, *, drop_after: float = 1.0) -> Path:
    """A 3-node cluster on free loopback ports: a slow edge (``DEMO_SLOWDOWN``), a ``DEMO_UPLINK`` uplink with
    2 ms latency that drops to ``DEMO_DROPPED`` ``drop_after`` seconds into the run, and a fast datacentre
    hop. One request at a time (window 1), the case the planner's latency model describes.

    Before the drop the planner sends the input to the cloud (about 1.5x faster than computing on the edge);
    once the drop is measured, computing on the edge is several times faster and the entry re-plans. Both
    margins are wide so that the story holds on a loaded machine too. The file declares no edge -> cloud2
    link, so a plan that skips cloud1 is planned over the uplink too, and one measured drop reaches every
    plan that sends anything.
    """
    import yaml

    spec = {
        "package": str(package.resolve()),
        "nodes": [{"name": "edge", "role": "edge", "slowdown": DEMO_SLOWDOWN},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "bandwidth": DEMO_UPLINK, "latency": "2ms", "codec": "auto",
                   "changes": [{"at": f"{drop_after}s", "bandwidth": DEMO_DROPPED}]},
                  {"from": "cloud1", "to": "cloud2", "bandwidth": "1Gbit", "latency": "1ms", "codec": "auto"}],
        "batching": {"max_batch": 8, "max_wait": "2ms"},
        "window": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
