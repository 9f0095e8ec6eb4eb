"""Parts 3 and 4 of bench/transport.py: the 3-stage chain against its ideal, and its zero-compute ceiling
(what the ideal is, and why it is taken inside the chain, is in bench/transport.py's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import TensorDataset

import splitexit
from local_nodes import start_local_cluster
from splitexit import EarlyExitNet, build_model
from splitexit.config import ClusterSpec, CpuSettings, ModelSource
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import free_port
from splitexit.runtime import request_path
from splitexit.runtime.hop import RowResult
from splitexit.runtime.node import Node
from splitexit.runtime.placement import default_placement
from splitexit.runtime.security import write_token
from transport_common import SEED, Settings

# ------------------------------------------------------------------------------------------ parts 3 and 4
NODE_NAMES = ("edge", "cloud1", "cloud2")
WINDOW = 16
#: Batches the ceiling runs keep in flight: enough that neither the window nor the pipeline's depth is the limit.
CEILING_BATCHES = 8
#: Chain runs that correct each target's slowdowns from the stage times inside the chain.
CHAIN_CALIBRATIONS = 2
STARTS: list[int] = []  # attempts each LocalCluster start needed (process mode)


def ceiling_window(max_batch: int) -> int:
    return max(WINDOW, CEILING_BATCHES * max_batch)


def cluster_dict(slowdowns: dict[str, float], max_batch: int, package: Path | None = None, window: int = WINDOW
                 ) -> dict:
    """A 3-node chain on free loopback ports, raw codec."""
    nodes = [{"name": "edge", "role": "edge", "slowdown": slowdowns["edge"]}] + [
        {"name": name, "address": f"127.0.0.1:{free_port()}", "slowdown": slowdowns[name]}
        for name in NODE_NAMES[1:]]
    links = [{"from": a, "to": b, "codec": "raw"} for a, b in zip(NODE_NAMES, NODE_NAMES[1:])]
    spec = {"nodes": nodes, "links": links, "batching": {"max_batch": max_batch, "max_wait": "1ms"},
            "window": window, "message_limit": "64MiB"}
    return spec if package is None else {"package": str(package.resolve()), **spec}


def make_cluster(slowdowns: dict[str, float], max_batch: int, window: int = WINDOW) -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump(cluster_dict(slowdowns, max_batch,
                                                                                 window=window))))


def write_cluster_file(directory: Path, package: Path, slowdowns: dict[str, float], max_batch: int,
                       window: int = WINDOW) -> tuple[Path, ClusterSpec]:
    """A cluster file with ``package:`` and fresh ports, beside a cluster token (the default ``cluster.token``
    that ``splitexit up`` writes); validated and read the way the nodes will read it."""
    path = directory / "cluster.yaml"
    if not (directory / "cluster.token").exists():
        write_token(directory / "cluster.token")
    path.write_text(yaml.safe_dump(cluster_dict(slowdowns, max_batch, package, window), sort_keys=False))
    return path, load_cluster(path)


def digits_package(directory: Path) -> EarlyExitNet:
    """digits_cnn with random weights and its (uncalibrated) default policy, saved as a package that the
    node processes load, and loaded back here so the edge runs the very same net (and plan version)."""
    torch.manual_seed(SEED)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10))
    net.cpu = CpuSettings(threads=1)  # every node process runs torch on 1 thread, like this process
    splitexit.save(net, directory)
    return splitexit.load(directory).eval()


def stage_times(net: EarlyExitNet, cluster: ClusterSpec, slowdowns: dict[str, float] | None,
                runs: int, batch: int = 1) -> dict[str, float]:
    """Median seconds per stage run of ``batch`` rows, as StageExecutor does it (stage.run, then the
    slowdown's sleep)."""
    placement = default_placement(net, cluster)
    tensors = (net._prepare(torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(SEED))),)
    result = {}
    for part in placement.stages:
        stage = net.stage(part.start, part.end)
        (name,) = part.nodes
        slowdown = 1.0 if slowdowns is None else slowdowns[name]
        samples = []
        with torch.inference_mode():
            for i in range(runs + 5):
                started = time.perf_counter()
                out = stage.run(tensors)
                compute = time.perf_counter() - started
                if slowdown > 1:
                    time.sleep(compute * (slowdown - 1))
                if i >= 5:
                    samples.append(time.perf_counter() - started)
        result[name] = statistics.median(samples)
        tensors = out.forward
    return result


class StageClock:
    """Each node's batches inside the chain, read off the ``compute_start``/``compute_end`` stamps that every
    answer carries back to the edge (the slowdown's sleep included, as the executor counts it). Rows that
    share a node's ``compute_start`` were one batch there. Instrumentation only: while a run is clocked, the
    edge's ``request_record`` also hands each outcome here."""

    def __init__(self) -> None:
        self.batches: dict[str, dict[float, list[float]]] = {}  # node -> compute_start -> [seconds, rows]

    def clear(self) -> None:
        self.batches.clear()

    def add(self, outcome: object) -> None:
        if not isinstance(outcome, RowResult):
            return
        first: dict[tuple[str, str], float] = {}
        for node, event, at in outcome.trace:
            first.setdefault((node, event), at)
        for (node, event), at in first.items():
            end = first.get((node, "compute_end"))
            if event == "compute_start" and end is not None:
                batch = self.batches.setdefault(node, {}).setdefault(at, [end - at, 0])
                batch[1] += 1

    def inside(self) -> dict[str, tuple[float, float]]:
        """node -> (mean batch seconds, mean batch rows): means, since busy time adds up (a few slow batches
        cost the chain their whole length; a median would hide them)."""
        return {node: (statistics.mean(s for s, _ in b.values()), statistics.mean(n for _, n in b.values()))
                for node, b in self.batches.items() if b}

    @contextlib.contextmanager
    def clocking(self) -> Iterator[None]:
        original = request_path.request_record

        def record(outcome, **kwargs):  # noqa: ANN001, ANN003, ANN202
            self.add(outcome)
            return original(outcome, **kwargs)

        request_path.request_record = record  # type: ignore[assignment]
        try:
            yield
        finally:
            request_path.request_record = original


@dataclass(frozen=True)
class ChainRun:
    throughput: float  # inputs/s
    nodes: list[str]  # the nodes that answered
    errors: int
    inside: dict[str, tuple[float, float]]  # node -> (mean batch seconds, mean batch rows) inside the chain


async def _drive(entry: Entry, dataset: TensorDataset) -> ChainRun:
    """The entry is started; warm up, then time the dataset, clocking every node's batches."""
    clock = StageClock()
    with clock.clocking():
        await entry.run(TensorDataset(*(t[:32] for t in dataset.tensors)))  # warm-up, untimed
        clock.clear()
        result = await entry.run(dataset)
    errors = sum(1 for r in result.records if r.error)
    return ChainRun(len(dataset) / result.wall_s, sorted({r.node for r in result.records}), errors, clock.inside())


async def run_in_process(net: EarlyExitNet, cluster: ClusterSpec, dataset: TensorDataset) -> ChainRun:
    """All three nodes in this process."""
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-stages-") as cache:
        nodes = [Node(cluster, n.name, cache_dir=Path(cache) / n.name) for n in cluster.nodes[1:]]
        for node in nodes:
            await node.start()
        entry = Entry(net, cluster)
        try:
            await entry.start()  # its coordinator assigns the nodes their stages
            return await _drive(entry, dataset)
        finally:
            await entry.close()
            for node in nodes:
                await node.stop(grace=2)


def run_processes(net: EarlyExitNet, package: Path, slowdowns: dict[str, float], max_batch: int,
                  dataset: TensorDataset, workdir: Path, window: int = WINDOW) -> ChainRun:
    """cloud1 and cloud2 as node processes (``LocalCluster``), the edge an ``Entry`` here."""
    local, cluster, attempts = start_local_cluster(
        lambda: write_cluster_file(workdir, package, slowdowns, max_batch, window), workdir)
    STARTS.append(attempts)
    try:
        async def go() -> ChainRun:
            entry = Entry(net, cluster)
            try:
                await entry.start()
                return await _drive(entry, dataset)
            finally:
                await entry.close()

        return asyncio.run(go())
    finally:
        local.stop()


@dataclass(frozen=True)
class ChainResult:
    mode: str
    stage_ms: float  # the batch-1 target
    max_batch: int
    slowdowns: dict[str, float]
    ideal: float
    measured: float
    fractions: list[float]  # per round, measured / that round's ideal
    inside: dict[str, tuple[float, float]]  # node -> (mean batch ms, mean rows) inside the chain, median of rounds
    answered_by: list[str]
    errors: int


@dataclass(frozen=True)
class Ceiling:
    mode: str
    max_batch: int
    window: int
    throughput: float
    rounds: list[float]
    edge_rows: float
    errors: int


def calibrate(net: EarlyExitNet, settings: Settings, target_ms: float) -> dict[str, float]:
    """Slowdowns that stretch each batch-1 stage to about ``target_ms``."""
    probe = make_cluster(dict.fromkeys(NODE_NAMES, 1.0), 1)
    base = stage_times(net, probe, None, settings.calib * 3)
    slowdowns = {name: max(1.0, target_ms / 1e3 / seconds) for name, seconds in base.items()}
    for _ in range(2):  # compute interleaved with sleeps runs slower than back to back: correct for it
        got = stage_times(net, probe, slowdowns, settings.calib)
        slowdowns = {name: max(1.0, slowdowns[name] * target_ms / 1e3 / got[name]) for name in slowdowns}
    return {name: round(value, 2) for name, value in slowdowns.items()}


def ideal_of(inside: dict[str, tuple[float, float]]) -> float:
    """Inputs/s of a chain whose stages took what they took inside it and nothing else cost anything: the
    busiest stage never idle (with the batches it got), or the window over one pass through every stage,
    whichever is less."""
    return min(min(rows / seconds for seconds, rows in inside.values()),
               WINDOW / sum(seconds for seconds, _ in inside.values()))


def measure_chains(settings: Settings, targets: Sequence[float], batches: Sequence[int], mode: str,
                   net: EarlyExitNet, package: Path, workdir: Path) -> tuple[list[ChainResult], list[Ceiling]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    dataset = TensorDataset(torch.randn(settings.inputs, 1, 8, 8, generator=generator),
                            torch.randint(0, 10, (settings.inputs,), generator=generator))
    many = TensorDataset(torch.randn(settings.ceiling_inputs, 1, 8, 8, generator=generator),
                         torch.randint(0, 10, (settings.ceiling_inputs,), generator=generator))
    bare = dict.fromkeys(NODE_NAMES, 1.0)

    def chain(which: dict[str, float], max_batch: int, window: int = WINDOW, inputs: TensorDataset = dataset
              ) -> ChainRun:
        if mode == "processes":
            return run_processes(net, package, which, max_batch, inputs, workdir, window)
        return asyncio.run(run_in_process(net, make_cluster(which, max_batch, window), inputs))

    def refined(target: float) -> dict[str, float]:
        """Slowdowns calibrated alone, then corrected twice from the chain's own batch-1 stage times (a
        stretched stage runs slower inside the chain than alone)."""
        slowdowns = calibrate(net, settings, target)
        for _ in range(CHAIN_CALIBRATIONS):
            inside = chain(slowdowns, 1).inside
            slowdowns = {name: round(max(1.0, slowdowns[name] * target / 1e3 / inside[name][0]), 2)
                         for name in NODE_NAMES}
        return slowdowns

    slowdowns = {target: refined(target) for target in targets}

    runs: dict[tuple[float, int], list[ChainRun]] = {}
    ceilings: dict[int, list[ChainRun]] = {b: [] for b in batches}
    for _ in range(settings.pipe_rounds):
        for max_batch in batches:
            for target in targets:
                runs.setdefault((target, max_batch), []).append(chain(slowdowns[target], max_batch))
            ceilings[max_batch].append(chain(bare, max_batch, ceiling_window(max_batch), many))
    results = []
    for (target, max_batch), got in runs.items():
        ideals = [ideal_of(r.inside) for r in got]
        inside = {name: (statistics.median(r.inside[name][0] for r in got) * 1e3,
                         statistics.median(r.inside[name][1] for r in got))
                  for name in NODE_NAMES if all(name in r.inside for r in got)}
        results.append(ChainResult(
            mode, target, max_batch, slowdowns[target], statistics.median(ideals),
            statistics.median(r.throughput for r in got), [r.throughput / ideal for r, ideal in zip(got, ideals)],
            inside, sorted({n for r in got for n in r.nodes}), sum(r.errors for r in got)))
    ceiling_rows = [Ceiling(mode, b, ceiling_window(b), statistics.median(r.throughput for r in rs),
                            [r.throughput for r in rs], statistics.median(r.inside["edge"][1] for r in rs),
                            sum(r.errors for r in rs))
                    for b, rs in ceilings.items()]
    return results, ceiling_rows


MODE_TITLES = {"processes": "cloud1, cloud2 as node processes (LocalCluster), the edge in this process",
               "in-process": "all three nodes in this process (one event loop)"}


def report_chains(settings: Settings, mode: str, results: list[ChainResult], ceilings: list[Ceiling]) -> None:
    print(f"\n(3) 3-stage chain vs ideal ({mode}: {MODE_TITLES[mode]}), digits_cnn, raw codec, window {WINDOW}, "
          f"{settings.inputs} inputs x {settings.pipe_rounds} rounds")
    print("    stage batches as they ran inside the chain (compute_start..compute_end stamps, slowdown included): "
          "mean ms x mean rows; ideal = min(rows / ms of the busiest stage, window / sum of the stages)")
    print(f"{'target':>7} {'max_batch':>9} | {'slowdowns e/c1/c2':>18} | {'inside: ms x rows e / c1 / c2':>36} | "
          f"{'ideal/s':>8} {'measured/s':>10} {'measured/ideal':>14}  per round")
    for r in results:
        slow = "/".join(f"{r.slowdowns[n]:.1f}" for n in NODE_NAMES)
        inside = " / ".join(f"{ms:.2f}x{rows:.1f}" for ms, rows in r.inside.values())
        fraction = statistics.median(r.fractions)
        flag = "  (target >= 0.9)" if r.stage_ms == 3 and r.max_batch == 1 else ""
        print(f"{r.stage_ms:5g}ms {r.max_batch:9d} | {slow:>18} | {inside:>36} | {r.ideal:8.1f} "
              f"{r.measured:10.1f} {fraction:14.3f}  {', '.join(f'{f:.3f}' for f in r.fractions)}{flag}")
    answered = sorted({n for r in results for n in r.answered_by})
    print(f"    answered by {answered}, errors {sum(r.errors for r in results)}")
    print(f"\n(4) zero-compute ceiling ({mode}): slowdown 1 everywhere, {settings.ceiling_inputs} inputs, window "
          f"{CEILING_BATCHES} x max_batch (at least {WINDOW}), inputs/s (median; per round), edge mean batch rows")
    for c in ceilings:
        print(f"  max_batch {c.max_batch} (window {c.window}): {c.throughput:7.1f}  "
              f"({', '.join(f'{t:.1f}' for t in c.rounds)}), "
              f"edge batches of {c.edge_rows:.1f} rows, errors {c.errors}")

