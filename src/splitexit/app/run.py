"""The distributed commands end to end (node, up, run, etcd), one function each, for the thin CLI."""

from __future__ import annotations

import asyncio
import csv
import datetime
import json
import logging
import platform
import signal
import time
from collections.abc import Callable, Sequence, Sized
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import Dataset, Subset

from splitexit.about import installed_version
from splitexit.aio import stop as aio_stop
from splitexit.app.package_data import DEFAULT_SPLIT, package_dataset
from splitexit.app.plan import DEFAULT_OBJECTIVE, profile_package
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.load import default_token_file, load_cluster, require_token, resolve_package
from splitexit.control.edge import Entry, RunResult
from splitexit.control.etcd_auth import start_secured_etcd
from splitexit.control.etcd_server import DevEtcd
from splitexit.control.local_cluster import LocalCluster, die_with_parent
from splitexit.control.replan import PlanningPlacer, file_codecs
from splitexit.control.worker import serve_node
from splitexit.errors import ClusterError
from splitexit.model.cpu import apply_threads
from splitexit.model.data import split_dataset
from splitexit.model.package import load, read_spec
from splitexit.plan.objective import Objective
from splitexit.runtime.node import Node
from splitexit.runtime.records import BREAKDOWN, RequestRecord
from splitexit.runtime.security import write_token
from splitexit.runtime.stage_cache import default_cache_dir

__all__ = ["DEV_ETCD_DIR", "DEV_ETCD_PORT", "ensure_cluster_token", "run_cluster", "serve", "serve_dev_etcd",
           "serve_local_cluster", "start_cluster", "StopRequest", "stop_signals", "wait_for_stop", "write_records"]

logger = logging.getLogger(__name__)

#: Where `splitexit etcd` keeps its data (kept between runs), and its client port on 127.0.0.1 (etcd's own;
#: the peer port is the next one).
DEV_ETCD_DIR = Path(".splitexit-etcd")
DEV_ETCD_PORT = 2379
#: How often a foreground command checks that what it serves is still alive.
ALIVE_POLL_S = 0.5


def serve(cluster_file: Path, name: str, *, address: str | None = None, tier: int | None = None,
          cache_dir: Path | None = None, port: int | None = None, data_port: int | None = None,
          parent: int | None = None) -> None:
    """Run one worker node until SIGTERM/SIGINT (or until ``parent`` dies, when given).

    A node that is not in the cluster file (one joining a running cluster) needs ``address`` and ``tier``.
    """
    if parent is not None:
        die_with_parent(parent)
    cluster = load_cluster(cluster_file)
    require_token(cluster_file, cluster)
    spec = _node_spec(cluster, cluster_file, name, address, tier)
    if data_port is not None:
        spec = spec.model_copy(update={"data_port": data_port})
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
    """Start every worker of the file locally and wait until all are ready (the caller stops them).

    A file that names no token gets one generated beside it first (see :func:`ensure_cluster_token`).
    """
    ensure_cluster_token(cluster_file)
    cluster = load_cluster(cluster_file)
    local = LocalCluster(cluster_file, cluster, log_dir=log_dir, cache_root=cache_root, verbose=verbose)
    local.start()
    return local


def ensure_cluster_token(cluster_file: Path) -> Path | None:
    """Write a random token beside a cluster file that names none (and has none there yet); the path written.

    Every process started from the file (nodes, the edge, `profile`, `plan`) then reads the same token, so a
    cluster is never open to any local process by default.
    """
    target = default_token_file(cluster_file, load_cluster(cluster_file, read_secrets=False))
    if target is None:
        return None
    write_token(target)
    logger.warning("wrote a new cluster token to %s (mode 0600): every node and the edge need this file beside "
                   "their copy of %s", target, cluster_file.name)
    return target


def serve_local_cluster(cluster_file: Path, *, log_dir: Path | None = None,
                        on_ready: Callable[[LocalCluster], None] | None = None) -> None:
    """Run every worker of the file on this machine until SIGTERM or Ctrl-C, then stop them all."""
    local = start_cluster(cluster_file, log_dir=log_dir)
    try:
        stop = stop_signals()  # before "ready" is said: a Ctrl-C right after it must find the handler
        if on_ready is not None:
            on_ready(local)
        wait_for_stop(stop)
    finally:
        local.stop()


def serve_dev_etcd(data_dir: Path = DEV_ETCD_DIR, *, port: int = DEV_ETCD_PORT, peer_port: int | None = None,
                   cluster_file: Path | None = None, on_ready: Callable[[DevEtcd], None] | None = None) -> None:
    """Run a development etcd on 127.0.0.1 until SIGTERM or Ctrl-C; one that exits on its own is an error.

    Its peer port (raft's, unused by one member but always bound) is ``peer_port``, by default ``port + 1``: a
    fixed port, because etcd keeps the peer address it started with in its data directory. Both ports are
    checked first, so that a busy one is named instead of hidden in etcd's log. With ``cluster_file`` it is
    secured for that cluster: TLS from its CA, a user per node (`etcd_auth.py`).
    """
    import socket  # only here: the one command that binds ports it is told

    peer = port + 1 if peer_port is None else peer_port
    if peer == port:
        raise ClusterError(f"--peer-port {peer} is the client port too; give etcd two different ports")
    for number, flag in ((port, "--port"), (peer, "--peer-port" if peer_port is not None else "--port + 1")):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd binds: TIME_WAIT is no obstacle
            try:
                probe.bind(("127.0.0.1", number))
            except OSError as exc:
                raise ClusterError(f"etcd's {'client' if number == port else 'peer'} port {number} ({flag}) cannot "
                                   f"be used on 127.0.0.1: {exc.strerror}. Is another etcd running? Choose another "
                                   "with --port / --peer-port") from None
    if cluster_file is None:
        server = DevEtcd(data_dir, port=port, peer_port=peer).start()
    else:
        cluster = load_cluster(cluster_file, read_secrets=False)  # etcd needs no token
        server = start_secured_etcd(cluster, data_dir, port=port, peer_port=peer)
    try:
        stop = stop_signals()  # before "ready" is said: a Ctrl-C right after it must find the handler
        if on_ready is not None:
            on_ready(server)
        stopped = wait_for_stop(stop, lambda: server.running)
    finally:
        server.stop()
    if not stopped:
        raise ClusterError(f"etcd exited on its own; its log ends with:\n{server.log_tail()}")


class StopRequest:
    """Set by SIGTERM or Ctrl-C. A plain flag, not a ``threading.Event``: the handler runs on the main thread,
    possibly while that thread waits on the event, and ``Event.set`` would then wait for the lock that
    ``Event.wait`` holds, for ever (seen: `splitexit etcd` ignoring Ctrl-C)."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_: object) -> None:
        self.requested = True


def stop_signals() -> StopRequest:
    """A request that SIGTERM and Ctrl-C set from now on; call from the main thread. Both signals get a
    handler: a process started in the background by a shell inherits SIGINT ignored, and would otherwise
    never stop on it."""
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    return stop


def wait_for_stop(stop: StopRequest, alive: Callable[[], bool] | None = None) -> bool:
    """Block until ``stop`` (from :func:`stop_signals`) is set (True), or until ``alive`` says no (False)."""
    while not stop.requested:
        time.sleep(ALIVE_POLL_S)
        if stop.requested:
            break
        if alive is not None and not alive():
            return False
    return True


def run_cluster(package: Path | None, cluster_file: Path, *, data: str | None = None, split: str = DEFAULT_SPLIT,
                window: int | None = None, limit: int | None = None,
                objective: Objective | None = DEFAULT_OBJECTIVE,
                replan: bool = True, on_record: Callable[[RequestRecord], None] | None = None,
                trust_models: Sequence[str] = (), edge: str | None = None) -> RunResult:
    """Be the edge: stream a dataset split through the running cluster and collect every outcome.

    With an ``objective`` the planner places the model (profiling the package first if it has no
    profile yet) and, with ``replan``, places it again when measured links make another plan better;
    with ``objective=None`` the cluster file's layout (``ends_at``, or exits spread over the tiers) is used.
    User code the package names is imported only if ``trust_models`` or the file's `trusted_models` list it.
    Ctrl-C (SIGINT, in the main thread) stops the run: the result then holds what was answered so far and
    ``interrupted_of`` says of how many inputs. ``edge`` names which of the file's edges this is (with several).
    """
    cluster = load_cluster(cluster_file).for_edge(edge)
    trusted = (*trust_models, *cluster.trusted_models)
    package = resolve_package(cluster_file, cluster, package)
    spec = read_spec(package)
    net = load(package, trust_models=trusted)
    apply_threads(net.cpu)
    loaded, data_split = package_dataset(package, net, spec.data, data, trusted)
    dataset = split_dataset(loaded, data_split).get(split)
    if limit is not None:
        size = len(cast(Sized, dataset))  # every split is a Subset or ConcatDataset, both sized
        dataset = Subset(dataset, range(min(limit, size)))

    placer = None
    if objective is not None:
        profile = profile_package(package, data=data, trust_models=trusted).profile
        placer = PlanningPlacer(net, profile, objective, codecs=file_codecs(cluster))

    async def go() -> RunResult:
        entry = Entry(net, cluster, window=window, placer=placer, replan=replan)
        try:
            await entry.start()
            return await _until_interrupted(entry, dataset, on_record)
        finally:
            await entry.close()

    result = asyncio.run(go())
    metadata = {
        "package": str(package), "model": spec.model.name, "dataset": data or (spec.data.dataset if spec.data else ""),
        "split": split, "cluster file": str(cluster_file), "registry": "embedded" if cluster.registry == "embedded"
        else "etcd", "placement by": objective.kind if objective is not None else "cluster file",
        "started": datetime.datetime.fromtimestamp(result.started_at, datetime.UTC).isoformat(timespec="seconds"),
        "splitexit": installed_version(), "torch": torch.__version__, "python": platform.python_version(),
        "host": platform.node()}
    return replace(result, metadata=metadata, class_names=spec.classes or ())


async def _until_interrupted(entry: Entry, dataset: Dataset,
                             on_record: Callable[[RequestRecord], None] | None) -> RunResult:
    """``entry.run(dataset)``, or on SIGINT what was answered until then (a partial result, not an exception)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (RuntimeError, ValueError):  # not the main thread: Ctrl-C is the caller's business
        return await entry.run(dataset, on_record=on_record)
    answered: list[RequestRecord] = []

    def keep(record: RequestRecord) -> None:
        answered.append(record)
        if on_record is not None:
            on_record(record)

    started = time.perf_counter()
    running = loop.create_task(entry.run(dataset, on_record=keep))
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        stopping.cancel()
    if running.done():
        return running.result()
    await aio_stop(running)
    return await entry.result(answered, time.perf_counter() - started, interrupted_of=len(cast(Sized, dataset)))


def write_records(records: list[RequestRecord], path: Path) -> None:
    """One JSON line per input, in dataset order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in sorted(records, key=lambda r: r.index):
            handle.write(json.dumps(asdict(record)) + "\n")


def write_records_csv(records: list[RequestRecord], path: Path, class_names: Sequence[str] = ()) -> None:
    """One CSV row per input, in dataset order: the JSON lines' fields (the breakdown as one column per part),
    plus the predicted and true class names where the dataset has them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [f.name for f in fields(RequestRecord) if f.name != "breakdown_ms"]
    header = [*columns, "predicted_class", "label_class", *(f"{part}_ms" for part in BREAKDOWN)]

    def name(index: int | None) -> str:
        return class_names[index] if index is not None and 0 <= index < len(class_names) else ""

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for record in sorted(records, key=lambda r: r.index):
            writer.writerow([*("" if getattr(record, c) is None else getattr(record, c) for c in columns),
                             name(record.prediction), name(record.label),
                             *(record.breakdown_ms.get(part, "") for part in BREAKDOWN)])
