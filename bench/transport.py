"""Benchmark: what our transport costs per hop, and how close a 3-stage chain gets to its ideal throughput.

(1) **Per-hop round trip** of one float32 tensor (1 MB and 4 MB) on loopback, two contenders:

    * *ours*: ``encode_tensors`` (raw codec) -> ``wire.messages.batch_messages`` (the runtime's own builder)
      written on a grpc.aio bidi
      stream (``grpc_options(64 MiB)``) -> a minimal ``StageService.Stream`` servicer decodes the tensor
      with ``splitexit.wire.tensor_codec.decode`` and yields a small ``wire_pb2.Up`` with one ``Result`` ->
      the client reads it. Timed from before ``encode`` to after the read.
    * *tcp*: a plain blocking socket; an 8-byte length prefix and the tensor's bytes (sent from the
      tensor's memory, no copy) -> a server thread ``recv_into`` a buffer, ``torch.frombuffer`` on it,
      replies 8 bytes -> the client reads them.

    * *diagnostic, constructors*: the same, but the Down message is built with protobuf constructors
      (``Down(batch=Batch(tensors=...))``), as RemoteStage did before; it shows what those copies cost.

    Contenders alternate over rounds (the order rotates and flips every round); each round sends ``messages``
    tensors per contender; p50 is the median over all messages, and the ratio ours/tcp is the median of the per-round
    ratios of the p50s.

(2) **3-stage pipeline throughput**: edge + cloud1 + cloud2 (real gRPC on loopback, raw codec, max_batch 1,
    window 16) over digits_cnn with random weights and an uncalibrated policy, so every input runs through
    all three stages. The net is saved as a model package (``splitexit.save``) that every node loads.
    Two modes:

    * ``--processes`` (the default): cloud1 and cloud2 are real node processes started by
      ``LocalCluster`` from a cluster file (``package:``, per-node ``slowdown``, free loopback ports), as
      deployed; the edge is an ``Entry`` in this process.
    * ``--in-process``: all three nodes share this process and its event loop (gRPC, batching, decoding).
    * ``--both``: both, one after the other.
 Each node gets a ``slowdown`` that stretches its stage's
    batch-1 compute to about ``--stage-ms`` (default 3 ms). The ideal throughput is
    1 / max(per-stage time), each stage timed alone the way the executor runs it (``stage.run`` then the
    slowdown's sleep). Calibration and pipeline runs alternate over rounds; medians are reported.

Each mode also runs the same chain with slowdown 1 everywhere: that throughput is the runtime's own
ceiling in that mode. In-process, all three stages share one event loop and the GIL; the slowdown is a
sleep in each stage's worker thread, so stages overlap like separate machines would only as far as the
GIL and the shared loop allow. In process mode three processes share the box's cores (often fewer than
three); the stage work is mostly the slowdown's sleep, so it still overlaps.

Run ``.venv/bin/python bench/transport.py`` (``--quick``: fewer rounds and inputs; ``--both``: both modes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

import splitexit
from local_nodes import start_local_cluster
from splitexit import EarlyExitNet, build_model
from splitexit.config import ClusterSpec, CpuSettings, ModelSource
from splitexit.config.codec_names import parse_codec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import free_port
from splitexit.runtime.node import Node
from splitexit.runtime.placement import default_placement
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.messages import batch_messages, encode_tensors, grpc_options
from splitexit.wire.tensor_codec import decode

MIB = 1 << 20
MESSAGE_LIMIT = 64 * MIB
SIZES_MB = (1, 4)
SEED = 0


@dataclass(frozen=True)
class Settings:
    rounds: int  # ABAB rounds of part 1
    messages: int  # messages per contender per round
    warmup: int  # untimed messages per contender before the rounds
    pipe_rounds: int  # calibration + pipeline rounds of part 2
    inputs: int  # inputs per pipeline run
    calib: int  # timed stage runs per stage per calibration


FULL = Settings(rounds=8, messages=25, warmup=10, pipe_rounds=3, inputs=300, calib=60)
QUICK = Settings(rounds=3, messages=10, warmup=5, pipe_rounds=1, inputs=120, calib=30)


# ------------------------------------------------------------------------------------------ part 1: ours
class _EchoServicer(wire_pb2_grpc.StageServiceServicer):
    """Decodes each batch's first tensor and answers with one tiny Result per batch."""

    async def Stream(self, requests, context):  # noqa: ANN001, ANN201 - grpc types
        async for down in requests:
            if down.WhichOneof("body") != "batch":
                continue
            batch = down.batch
            tensor = decode(batch.tensors[0], max_bytes=MESSAGE_LIMIT)
            yield wire_pb2.Up(results=[wire_pb2.Result(request_id=batch.request_ids[0], exit=0,
                                                       prediction=int(tensor.numel() & 7), node="echo")])


class OursClient:
    def __init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self.call = None
        self.codec = parse_codec("raw")
        self.next_id = 1

    async def start(self) -> None:
        self.server = grpc.aio.server(options=grpc_options(MESSAGE_LIMIT))
        wire_pb2_grpc.add_StageServiceServicer_to_server(_EchoServicer(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(MESSAGE_LIMIT))
        await self.channel.channel_ready()
        self.call = wire_pb2_grpc.StageServiceStub(self.channel).Stream()

    async def round_trip(self, tensor: torch.Tensor, *, copy_from: bool = False) -> float:
        """``copy_from=True``: the message is built by ``batch_messages`` (filled in place with
        CopyFrom), as the runtime sends it. ``False``: built with protobuf constructors (the old way), a
        diagnostic that shows what the constructor copies cost."""
        started = time.perf_counter()
        request_id, self.next_id = self.next_id, self.next_id + 1
        tensors = encode_tensors((tensor,), self.codec)
        if copy_from:
            (down,) = batch_messages(1, [request_id], tensors, [], MESSAGE_LIMIT)  # exactly what RemoteStage sends
        else:
            down = wire_pb2.Down(batch=wire_pb2.Batch(plan_version=1, request_ids=[request_id], tensors=tensors))
        await self.call.write(down)
        up = await self.call.read()
        elapsed = time.perf_counter() - started
        assert up.results[0].request_id == request_id, up
        return elapsed

    async def close(self) -> None:
        if self.call is not None:
            await self.call.done_writing()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(grace=1)


# ------------------------------------------------------------------------------------------ part 1: tcp
def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        count = sock.recv_into(view)
        if not count:
            raise ConnectionError("peer closed")
        view = view[count:]


class TcpClient:
    """Length-prefixed raw TCP: a server thread turns each payload into a tensor and answers 8 bytes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, name="tcp-echo", daemon=True)
        self.thread.start()
        self.sock = socket.create_connection(self.listener.getsockname())
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = bytearray(8)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(8)
        buffer = bytearray(0)
        with conn:
            while True:
                try:
                    _recv_exact(conn, memoryview(header))
                except ConnectionError:
                    return
                (size,) = struct.unpack("<Q", header)
                if len(buffer) < size:
                    buffer = bytearray(size)
                _recv_exact(conn, memoryview(buffer)[:size])
                tensor = torch.frombuffer(buffer, dtype=torch.float32, count=size // 4)
                conn.sendall(struct.pack("<Q", tensor.numel()))

    def round_trip(self, tensor: torch.Tensor) -> float:
        started = time.perf_counter()
        payload = memoryview(tensor.contiguous().numpy()).cast("B")
        self.sock.sendall(struct.pack("<Q", payload.nbytes))
        self.sock.sendall(payload)
        _recv_exact(self.sock, memoryview(self.reply))
        elapsed = time.perf_counter() - started
        assert struct.unpack("<Q", self.reply)[0] == tensor.numel()
        return elapsed

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)
        self.listener.close()


@dataclass(frozen=True)
class HopRow:
    size_mb: int
    ours_p50_ms: float
    copy_from_p50_ms: float
    tcp_p50_ms: float
    ratio: float  # median over rounds of ours p50 / tcp p50
    ratio_min: float
    ratio_max: float
    copy_from_ratio: float  # median over rounds of the constructor diagnostic's p50 / tcp p50


async def measure_hop(settings: Settings) -> list[HopRow]:
    ours, tcp = OursClient(), TcpClient()
    await ours.start()
    rows = []
    try:
        for size_mb in SIZES_MB:
            tensor = torch.randn(size_mb * MIB // 4, generator=torch.Generator().manual_seed(SEED))
            contenders = ("ours", "copy_from", "tcp")

            async def one(name: str, tensor: torch.Tensor = tensor) -> float:
                if name == "tcp":
                    return tcp.round_trip(tensor)
                return await ours.round_trip(tensor, copy_from=name == "ours")  # "copy_from" = the old constructor path

            for _ in range(settings.warmup):
                for name in contenders:
                    await one(name)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            ratios, copy_ratios = [], []
            for r in range(settings.rounds):
                order = contenders[r % 3:] + contenders[:r % 3]  # rotate who goes first (ABCABC, BCA..., CAB...)
                order = order if r % 2 == 0 else order[::-1]
                medians = {}
                for name in order:
                    got = [await one(name) for _ in range(settings.messages)]
                    times[name] += got
                    medians[name] = statistics.median(got)
                ratios.append(medians["ours"] / medians["tcp"])
                copy_ratios.append(medians["copy_from"] / medians["tcp"])
            rows.append(HopRow(size_mb, statistics.median(times["ours"]) * 1e3,
                               statistics.median(times["copy_from"]) * 1e3, statistics.median(times["tcp"]) * 1e3,
                               statistics.median(ratios), min(ratios), max(ratios), statistics.median(copy_ratios)))
    finally:
        await ours.close()
        tcp.close()
    return rows


# ------------------------------------------------------------------------------------------ part 2
NODE_NAMES = ("edge", "cloud1", "cloud2")
STARTS: list[int] = []  # attempts each LocalCluster start needed (process mode)


def cluster_dict(slowdowns: dict[str, float], package: Path | None = None) -> dict:
    """A 3-node chain on free loopback ports, raw codec, max_batch 1, window 16."""
    nodes = [{"name": "edge", "role": "edge", "slowdown": slowdowns["edge"]}] + [
        {"name": name, "address": f"127.0.0.1:{free_port()}", "slowdown": slowdowns[name]}
        for name in NODE_NAMES[1:]]
    links = [{"from": a, "to": b, "codec": "raw"} for a, b in zip(NODE_NAMES, NODE_NAMES[1:])]
    spec = {"nodes": nodes, "links": links, "batching": {"max_batch": 1, "max_wait": "1ms"}, "window": 16,
            "message_limit": "64MiB"}
    return spec if package is None else {"package": str(package.resolve()), **spec}


def make_cluster(slowdowns: dict[str, float]) -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump(cluster_dict(slowdowns))))


def write_cluster_file(directory: Path, package: Path, slowdowns: dict[str, float]) -> tuple[Path, ClusterSpec]:
    """A cluster file with ``package:`` and fresh ports; validated the way the nodes will read it."""
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster_dict(slowdowns, package), sort_keys=False))
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
                runs: int) -> dict[str, float]:
    """Median seconds per batch-1 stage run, as StageExecutor does it (stage.run, then the slowdown's sleep)."""
    placement = default_placement(net, cluster)
    tensors = (net._prepare(torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(SEED))),)
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


def _instrument(busy: dict[str, list[float]], name: str, executor) -> None:  # noqa: ANN001
    """Time each batch of ``executor._compute`` (slowdown included) into ``busy[name]``."""
    busy[name] = []

    def timed(jobs, _compute=executor._compute, _out=busy[name]):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        replies = _compute(jobs)
        _out.append(time.perf_counter() - started)
        return replies

    executor._compute = timed  # instrumentation only: the stage runs exactly as before


async def _drive(entry: Entry, dataset: TensorDataset, busy: dict[str, list[float]]):  # noqa: ANN202
    """The entry is started (and instrumented); warm up, then time the dataset."""
    await entry.run(TensorDataset(*(t[:32] for t in dataset.tensors)))  # warm-up, untimed
    for samples in busy.values():
        samples.clear()
    return await entry.run(dataset)


def _summary(result, dataset: TensorDataset, busy: dict[str, list[float]]):  # noqa: ANN001, ANN202
    errors = sum(1 for r in result.records if r.error)
    inside = {name: statistics.median(samples) for name, samples in busy.items() if samples}
    return len(dataset) / result.wall_s, sorted({r.node for r in result.records}), errors, inside


async def run_in_process(net: EarlyExitNet, cluster: ClusterSpec, dataset: TensorDataset
                         ) -> tuple[float, list[str], int, dict[str, float]]:
    """All three nodes in this process. Inputs per second over ``dataset``, the nodes that answered, the
    number of errors, and each stage's median batch time inside the pipeline (slowdown included)."""
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-stages-") as cache:
        nodes = [Node(cluster, n.name, cache_dir=Path(cache) / n.name) for n in cluster.nodes[1:]]
        for node in nodes:
            await node.start()
        entry = Entry(net, cluster)
        try:
            await entry.start()  # its coordinator assigns the nodes their stages
            version = entry.placement.version
            busy: dict[str, list[float]] = {}
            for name, executor in [("edge", entry.hop.executor),  # type: ignore[union-attr]
                                   *((n.name, n.plans[version].hop.executor) for n in nodes)]:
                _instrument(busy, name, executor)
            result = await _drive(entry, dataset, busy)
        finally:
            await entry.close()
            for node in nodes:
                await node.stop(grace=2)
    return _summary(result, dataset, busy)


def run_processes(net: EarlyExitNet, package: Path, slowdowns: dict[str, float],
                  dataset: TensorDataset, workdir: Path) -> tuple[float, list[str], int, dict[str, float]]:
    """cloud1 and cloud2 as node processes (``LocalCluster``), the edge an ``Entry`` here. Same return as
    ``run_in_process``; only the edge's batch time can be timed from here."""
    local, cluster, attempts = start_local_cluster(lambda: write_cluster_file(workdir, package, slowdowns), workdir)
    STARTS.append(attempts)
    try:
        async def go():  # noqa: ANN202
            entry = Entry(net, cluster)
            busy: dict[str, list[float]] = {}
            try:
                await entry.start()
                _instrument(busy, "edge", entry.hop.executor)  # type: ignore[union-attr]
                return _summary(await _drive(entry, dataset, busy), dataset, busy)
            finally:
                await entry.close()

        return asyncio.run(go())
    finally:
        local.stop()


@dataclass(frozen=True)
class PipeResult:
    mode: str
    slowdowns: dict[str, float]
    base_ms: dict[str, float]
    stage_ms: dict[str, float]  # medians over rounds, each stage timed alone
    inside_ms: dict[str, float]  # medians over rounds, each stage's batch time inside the pipeline
    ideal: float
    measured: float
    fractions: list[float]  # per round, measured / ideal
    answered_by: list[str]
    errors: int
    bare: float  # median inputs/s of the same chain with slowdown 1 everywhere: the runtime's own ceiling here
    bare_rounds: list[float]


def calibrate(net: EarlyExitNet, settings: Settings, target_ms: float) -> tuple[dict[str, float], dict[str, float]]:
    """(slowdowns that stretch each stage to about ``target_ms``, each stage's bare compute in seconds)."""
    probe = make_cluster(dict.fromkeys(NODE_NAMES, 1.0))
    base = stage_times(net, probe, None, settings.calib * 3)
    slowdowns = {name: max(1.0, target_ms / 1e3 / seconds) for name, seconds in base.items()}
    for _ in range(2):  # compute interleaved with sleeps runs slower than back to back: correct for it
        got = stage_times(net, make_cluster(slowdowns), slowdowns, settings.calib)
        slowdowns = {name: max(1.0, slowdowns[name] * target_ms / 1e3 / got[name]) for name in slowdowns}
    return {name: round(value, 2) for name, value in slowdowns.items()}, base


def measure_pipeline(settings: Settings, target_ms: float, mode: str, net: EarlyExitNet,
                     package: Path, workdir: Path) -> PipeResult:
    slowdowns, base = calibrate(net, settings, target_ms)
    cluster = make_cluster(slowdowns)
    bare_slowdowns = dict.fromkeys(NODE_NAMES, 1.0)
    bare_cluster = make_cluster(bare_slowdowns)
    generator = torch.Generator().manual_seed(SEED + 1)
    dataset = TensorDataset(torch.randn(settings.inputs, 1, 8, 8, generator=generator),
                            torch.randint(0, 10, (settings.inputs,), generator=generator))

    def pipeline(which: dict[str, float], spec: ClusterSpec):  # noqa: ANN202
        if mode == "processes":
            return run_processes(net, package, which, dataset, workdir)
        return asyncio.run(run_in_process(net, spec, dataset))

    per_stage: dict[str, list[float]] = {name: [] for name in slowdowns}
    inside: dict[str, list[float]] = {name: [] for name in slowdowns}
    ideals, measured, fractions, bare = [], [], [], []
    answered_by: set[str] = set()
    errors = 0
    for _ in range(settings.pipe_rounds):
        times = stage_times(net, cluster, slowdowns, settings.calib)
        for name, seconds in times.items():
            per_stage[name].append(seconds)
        ideal = 1.0 / max(times.values())
        throughput, nodes, errs, busy = pipeline(slowdowns, cluster)
        for name, seconds in busy.items():
            inside[name].append(seconds)
        throughput_bare, _, errs_bare, _ = pipeline(bare_slowdowns, bare_cluster)
        bare.append(throughput_bare)
        answered_by |= set(nodes)
        errors += errs + errs_bare
        ideals.append(ideal)
        measured.append(throughput)
        fractions.append(throughput / ideal)
    return PipeResult(mode, slowdowns, {k: v * 1e3 for k, v in base.items()},
                      {k: statistics.median(v) * 1e3 for k, v in per_stage.items()},
                      {k: statistics.median(v) * 1e3 for k, v in inside.items() if v}, statistics.median(ideals),
                      statistics.median(measured), fractions, sorted(answered_by), errors, statistics.median(bare),
                      bare)


# ------------------------------------------------------------------------------------------ report
MODE_TITLES = {"processes": "cloud1, cloud2 as node processes (LocalCluster), edge in this process",
               "in-process": "all three nodes in this process (one event loop)"}


def report_pipeline(console: Console, settings: Settings, pipe: PipeResult) -> None:
    table = Table(title=f"(2) 3-stage pipeline ({pipe.mode}: {MODE_TITLES[pipe.mode]}), digits_cnn, raw codec, "
                        f"max_batch 1, window 16, {settings.inputs} inputs x {settings.pipe_rounds} rounds")
    for column in ("stage", "compute ms (alone)", "slowdown", "stage ms incl. slowdown (alone)",
                   "batch ms inside the pipeline"):
        table.add_column(column, justify="right")
    for name in pipe.slowdowns:
        inside = pipe.inside_ms.get(name)
        table.add_row(name, f"{pipe.base_ms[name]:.3f}", f"{pipe.slowdowns[name]:.2f}", f"{pipe.stage_ms[name]:.3f}",
                      "n/a (other process)" if inside is None else f"{inside:.3f}")
    console.print(table)
    table = Table(title=f"(2) throughput ({pipe.mode})")
    for column in ("ideal inputs/s", "measured inputs/s", "measured / ideal (median)", "per round",
                   "ceiling: slowdown 1 everywhere, inputs/s", "ceiling per round"):
        table.add_column(column, justify="right")
    table.add_row(f"{pipe.ideal:.1f}", f"{pipe.measured:.1f}", f"{statistics.median(pipe.fractions):.3f}",
                  ", ".join(f"{f:.3f}" for f in pipe.fractions), f"{pipe.bare:.1f}",
                  ", ".join(f"{b:.1f}" for b in pipe.bare_rounds))
    console.print(table)
    if len(pipe.inside_ms) == len(pipe.slowdowns):
        console.print(f"1 / max(batch time inside the pipeline) = {1e3 / max(pipe.inside_ms.values()):.1f} inputs/s")
    if pipe.mode == "processes":
        console.print(f"3 processes (edge here, cloud1, cloud2) on {os.cpu_count()} CPUs; the stage work is mostly "
                      f"the slowdown's sleep, so it overlaps even with fewer cores than processes")
    console.print(f"answered by {pipe.answered_by}, errors {pipe.errors}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and inputs")
    parser.add_argument("--stage-ms", type=float, default=3.0, help="target time per stage in part 2")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--processes", dest="mode", action="store_const", const="processes",
                      help="part 2 with cloud1 and cloud2 as node processes (the default)")
    mode.add_argument("--in-process", dest="mode", action="store_const", const="in-process",
                      help="part 2 with all nodes in this process")
    mode.add_argument("--both", dest="mode", action="store_const", const="both", help="part 2 in both modes")
    parser.set_defaults(mode="processes")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=150)
    console.print(f"python {platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}, "
                  f"{os.cpu_count()} CPUs, torch threads 1, settings {settings}")

    started = time.perf_counter()
    hops = asyncio.run(measure_hop(settings))
    table = Table(title=f"(1) per-hop round trip on loopback ({settings.rounds} alternating rounds x "
                        f"{settings.messages} messages per contender)")
    for column in ("tensor", "ours p50 ms", "raw TCP p50 ms", "ours / TCP (median of rounds)", "round range",
                   "diagnostic: Down via constructors, p50 ms", "constructors / TCP"):
        table.add_column(column, justify="right")
    for row in hops:
        table.add_row(f"{row.size_mb} MiB float32", f"{row.ours_p50_ms:.3f}", f"{row.tcp_p50_ms:.3f}",
                      f"{row.ratio:.2f}x", f"{row.ratio_min:.2f}-{row.ratio_max:.2f}", f"{row.copy_from_p50_ms:.3f}",
                      f"{row.copy_from_ratio:.2f}x")
    console.print(table)

    modes = ("processes", "in-process") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-") as tmp:
        package = Path(tmp) / "digits_pkg"
        net = digits_package(package)
        for mode_name in modes:
            pipe = measure_pipeline(settings, args.stage_ms, mode_name, net, package, Path(tmp))
            report_pipeline(console, settings, pipe)
    if STARTS:
        console.print(f"process mode: {len(STARTS)} cluster starts, {sum(STARTS) - len(STARTS)} retried "
                      f"(a node died before it was ready; its log went to stderr)")
    console.print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
