"""Benchmark: what the data plane costs per hop against raw sockets, and how close a 3-stage chain gets to its ideal.

Every comparison is measured side by side in one run: the contenders alternate over rounds (the order
rotates every round and flips every other round), and a ratio is the median over rounds of the same-round
ratio of the two contenders' medians; the range printed with it is the lowest and highest round's ratio.
Read only the ratios: on a shared box absolute times move from one minute to the next.

(1) **One hop round trip** on loopback, one float32 tensor of shape (1, n) at 64 KiB, 1 MiB and 4 MiB. The
    servers run in a process of their own (one for plain text, one for mutual TLS), as the next node would:

    * *ours*, the runtime's real path: ``encode_tensors`` with the raw codec -> ``RemoteStage.send`` (its
      emulated link with nothing emulated, its writer task, ``FrameConnection`` with ``sendmsg``) -> a real
      ``Node`` (``Node.start``: gRPC Health for the data port, then HELLO/WELCOME, credits, its
      ``DataService``) whose plan for that size serves a stage taking exactly that tensor. The node runs
      ``read_batch`` and ``decode_batch`` as always (in its worker thread above 64 KiB); the stage itself
      is a stand-in that answers each row at once (a ``RowResult`` of 10 logits), so no model compute is
      timed. The answer goes up as a RESULTS frame through the node's up link, and ``RemoteStage``
      resolves the row's future. Timed from before ``encode`` to the future's result. The stand-in is
      injected into ``node.plans`` (a stage file per size would only add model loading, not transport).
    * *raw TCP*: a blocking socket; an 8-byte length prefix, then the tensor's bytes from its own memory;
      the server thread ``recv_into`` a preallocated buffer, ``torch.frombuffer`` on it, replies 8 bytes.
    * *frames* (diagnostic): ``FrameConnection`` alone, a BATCH frame with a 64-byte metadata block to an
      echo server (``torch.frombuffer`` on the payload, a 2-byte RESULTS frame back): what the connection
      costs without ``RemoteStage`` and ``DataService`` around it.
    * the same three under mutual TLS (``client_tls``/``server_tls``, the cluster CA, node certificates):
      *ours+tls* (``security.tls`` in the node's cluster, RemoteStage with the edge's certificate),
      *raw TLS* (the raw contender over :mod:`ssl` sockets), *frames+tls*.

    p50 is the median over every timed message of a contender; targets: ours <= 1.2x raw TCP at 1 and 4 MiB,
    ours+tls <= 1.3x raw TLS.

(2) **Pipelined**: 4 x 1 MiB in flight (4 sends, then the 4 answers), throughput in MB/s; ratio ours/raw.

(3) **3-stage chain vs its ideal**: edge + cloud1 + cloud2 over digits_cnn with random weights and an
    uncalibrated policy (every input runs all three stages), raw codec, window 16, saved as a model package
    (``splitexit.save``) that every node loads. By default (``--processes``) cloud1 and cloud2 are node
    processes started by ``LocalCluster`` from a cluster file (``package:``, per-node ``slowdown``, a
    cluster token, free loopback ports), as deployed; the edge is an ``Entry`` in this process
    (``--in-process``: all three nodes in this process; ``--both``: both). Each node's ``slowdown``
    stretches its batch-1 stage to about 1, 3 and 10 ms (``--stage-ms``), for max_batch 1 and 8
    (``--max-batch``); the slowdowns are calibrated on stages run alone here, then corrected twice from
    batch-1 chain runs (the stage times inside the chain, below). The ideal is taken
    from the same run: every answer carries each node's ``compute_start``/``compute_end`` stamps back, so
    the bench knows how long each stage's batches took *inside the chain* (slowdown included) and how many
    rows they held; ideal = min(rows / seconds of the busiest stage, window / sum of the stages' batch
    seconds): the busiest stage never idle, or the window if it cannot keep every stage busy. What is left
    between measured and ideal is the runtime: transport, queues, scheduling. (Stage times alone are no
    ideal here: a 0.1 ms digits stage stretched by a slowdown of 20-30 runs 3-10x slower after each sleep
    than back to back, so timings alone and inside the chain disagree by more than the effect measured.)
    Medians over rounds are reported.

(4) **The chain's zero-compute ceiling**: the same chain, same mode, slowdown 1 everywhere, inputs/s, at each
    max_batch: what the runtime itself can move here.

Run ``.venv/bin/python bench/transport.py`` (``--quick``: fewer rounds and inputs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import platform
import secrets
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml
from torch.utils.data import TensorDataset

import splitexit
from local_nodes import start_local_cluster
from splitexit import EarlyExitNet, build_model
from splitexit.config import ClusterSpec, CpuSettings, ModelSource
from splitexit.config.codec_names import parse_codec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import free_port
from splitexit.runtime import request_path
from splitexit.runtime.frame_connection import FrameConnection, client_tls, connect, serve, server_tls
from splitexit.runtime.hop import RowResult
from splitexit.runtime.node import Node, Served
from splitexit.runtime.placement import default_placement
from splitexit.runtime.remote import RemoteStage
from splitexit.runtime.security import NodeCredentials, init_ca, issue_certificate, write_token
from splitexit.tensors import TensorInfo
from splitexit.wire.data_messages import encode_tensors
from splitexit.wire.framing import FrameLimits, FrameType

SEED = 0
SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "4 MiB": 4 << 20}
PIPELINED = "1 MiB"
IN_FLIGHT = 4
PREFIX = struct.Struct("!Q")
METADATA = bytes(64)
LIMITS = FrameLimits(payload=64 << 20)
NODE = "cloud1"
RAW = parse_codec("raw")
TOKEN = secrets.token_urlsafe(32)
PLAIN_GROUP = ("tcp", "frames", "ours")
TLS_GROUP = ("tls", "frames+tls", "ours+tls")
LABELS = {"tcp": "raw TCP", "frames": "frames", "ours": "ours", "tls": "raw TLS", "frames+tls": "frames+tls",
          "ours+tls": "ours+tls"}


@dataclass(frozen=True)
class Settings:
    rounds: int  # alternating rounds of parts 1 and 2
    messages: int  # round trips (or bursts) per contender per round
    warmup: int  # untimed round trips per contender before the rounds
    pipe_rounds: int  # stage timing + chain rounds of parts 3 and 4
    inputs: int  # inputs per chain run
    calib: int  # timed stage runs per stage per timing


FULL = Settings(rounds=8, messages=25, warmup=10, pipe_rounds=2, inputs=300, calib=40)
QUICK = Settings(rounds=3, messages=10, warmup=3, pipe_rounds=1, inputs=120, calib=20)


def tensor_of(size: int) -> torch.Tensor:
    return torch.randn(1, size // 4, generator=torch.Generator().manual_seed(SEED))


def alternating(names: Sequence[str], r: int) -> list[str]:
    """Round ``r``'s order: rotated by ``r``, reversed every other round."""
    order = list(names[r % len(names):]) + list(names[:r % len(names)])
    return order if r % 2 == 0 else order[::-1]


# ------------------------------------------------------------------------------------------ part 1: servers
def _recv_exact(conn: socket.socket, view: memoryview, size: int) -> memoryview | None:
    got = 0
    while got < size:
        n = conn.recv_into(view[got:size])
        if n == 0:
            return None
        got += n
    return view[:size]


def raw_serve(listener: socket.socket, tls: ssl.SSLContext | None) -> None:
    """One raw connection: length prefix, recv_into a preallocated buffer, frombuffer, 8 bytes back."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        conn = tls.wrap_socket(conn, server_side=True)
    view = memoryview(bytearray(64 << 20))
    try:
        while True:
            head = _recv_exact(conn, view, PREFIX.size)
            if head is None:
                return
            (size,) = PREFIX.unpack(head)
            if _recv_exact(conn, view, size) is None:
                return
            torch.frombuffer(view, dtype=torch.float32, count=size // 4)
            conn.sendall(PREFIX.pack(size))
    except OSError:
        return
    finally:
        conn.close()


async def frames_echo(connection: FrameConnection) -> None:
    try:
        while True:
            frame = await connection.receive()
            torch.frombuffer(frame.payload, dtype=torch.float32)
            await connection.send(FrameType.RESULTS, b"ok", batch_id=frame.batch_id)
    except ConnectionError:
        return


@dataclass(frozen=True)
class InputOnly:
    """What the node's data service reads of a stage: the tensors it takes."""

    input_tensors: tuple[TensorInfo, ...]


class _Idle:
    queued = 0


class Answering:
    """Stands in for a stage's ``Hop``: answers every row at once (prediction from the tensor's width)."""

    downstream = None
    in_flight = 0
    executor = _Idle()

    async def send(self, ids: Sequence[int], tensors: tuple[torch.Tensor, ...], trace: list) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = []
        for request_id in ids:
            future = loop.create_future()
            future.set_result(RowResult(request_id, 0, int(tensors[0].shape[1]) & 7, 1.0, [0.0] * 10, NODE, trace))
            futures.append(future)
        return futures

    async def close(self) -> None:
        return None

    async def close_when_idle(self, timeout: float) -> None:
        return None


def hop_cluster(tls_dir: str | None) -> dict:
    spec: dict[str, Any] = {
        "nodes": [{"name": "edge", "role": "edge"}, {"name": NODE, "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": NODE, "codec": "raw"}], "batching": {"max_batch": 1},
        "security": {"token": TOKEN}}
    if tls_dir is not None:
        spec["security"]["tls"] = tls_dir
    return spec


def _port_of(server: Any) -> int:  # noqa: ANN401 - asyncio.Server or FrameServer
    """The port a ``serve`` server listens on (``FrameServer.port``, or an ``asyncio.Server``'s socket)."""
    port = getattr(server, "port", None)
    return int(port) if port is not None else int(server.sockets[0].getsockname()[1])


def serve_hop(pipe: Any, spec: dict, tls_dir: str | None) -> None:  # noqa: ANN401 - a multiprocessing pipe
    """The server process of part 1: a real Node (a plan per size), a frame echo server, a raw server."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # frombuffer on read-only bytes
    asyncio.run(_serve_hop(pipe, spec, tls_dir))


async def _serve_hop(pipe: Any, spec: dict, tls_dir: str | None) -> None:  # noqa: ANN401
    cluster = ClusterSpec.model_validate(spec)
    tls = server_tls(Path(tls_dir), NODE) if tls_dir else None
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-hop-") as cache:
        node = Node(cluster, NODE, cache_dir=Path(cache))
        await node.start(port=0)
        for version, size in enumerate(SIZES.values(), start=1):
            stage = InputOnly((TensorInfo("x", (size // 4,), torch.float32),))
            node.plans[version] = Served(version, f"bench-{version}", stage, Answering(),
                                         frozenset({"edge"}))
        node.newest = len(SIZES)
        node.data.stages_changed()
        frames = await serve("127.0.0.1", 0, frames_echo, tls=tls, limits=LIMITS)
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=raw_serve, args=(listener, tls), daemon=True).start()
        pipe.send((node.port, _port_of(frames), listener.getsockname()[1]))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until the bench is done
        frames.close()
        await node.stop(grace=1)


# ------------------------------------------------------------------------------------------ part 1: clients
class RawClient:
    def __init__(self, port: int, tls: ssl.SSLContext | None):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname=NODE) if tls else sock
        self.reply = memoryview(bytearray(PREFIX.size))

    async def round_trip(self, label: str, tensor: torch.Tensor) -> None:
        self.send(tensor)
        self.read()

    async def burst(self, label: str, tensor: torch.Tensor, count: int) -> None:
        for _ in range(count):
            self.send(tensor)
        for _ in range(count):
            self.read()

    def send(self, tensor: torch.Tensor) -> None:
        data = memoryview(tensor.numpy()).cast("B")
        self.sock.sendall(PREFIX.pack(data.nbytes))
        self.sock.sendall(data)

    def read(self) -> None:
        if _recv_exact(self.sock, self.reply, PREFIX.size) is None:
            raise ConnectionError("the raw server closed")

    async def close(self) -> None:
        self.sock.close()


class FramesClient:
    def __init__(self, port: int, tls: ssl.SSLContext | None):
        self.port, self.tls = port, tls
        self.connection: FrameConnection | None = None
        self.ids = itertools.count(1)

    async def start(self) -> None:
        self.connection = await connect("127.0.0.1", self.port, tls=self.tls, server_name=NODE, limits=LIMITS)

    async def round_trip(self, label: str, tensor: torch.Tensor) -> None:
        await self.burst(label, tensor, 1)

    async def burst(self, label: str, tensor: torch.Tensor, count: int) -> None:
        assert self.connection is not None
        payload = [memoryview(tensor.numpy()).cast("B")]
        for _ in range(count):
            await self.connection.send(FrameType.BATCH, METADATA, payload, batch_id=next(self.ids))
        for _ in range(count):
            await self.connection.receive()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class OursClient:
    """One ``RemoteStage`` per size (each size is its own plan version on the node), as the edge sends."""

    def __init__(self, port: int, tls_dir: str | None):
        cluster = ClusterSpec.model_validate({**hop_cluster(tls_dir), "nodes": [
            {"name": "edge", "role": "edge"}, {"name": NODE, "address": f"127.0.0.1:{port}"}]})
        credentials = NodeCredentials.load(Path(tls_dir), "edge") if tls_dir else None
        self.stages = {label: RemoteStage(
            sender="edge", target=cluster.node(NODE), link=cluster.link("edge", NODE), plan_version=version,
            message_limit=cluster.message_limit, credentials=credentials,
            tls_dir=Path(tls_dir) if tls_dir else None, token=TOKEN)
            for version, label in enumerate(SIZES, start=1)}
        self.ids = itertools.count(1)

    async def start(self) -> None:
        for stage in self.stages.values():
            await stage.connect()

    async def round_trip(self, label: str, tensor: torch.Tensor) -> None:
        await self.burst(label, tensor, 1)

    async def burst(self, label: str, tensor: torch.Tensor, count: int) -> None:
        stage = self.stages[label]
        futures: list[asyncio.Future] = []
        for _ in range(count):
            futures += await stage.send([next(self.ids)], encode_tensors((tensor,), RAW), [])
        for outcome in await asyncio.gather(*futures):
            if not isinstance(outcome, RowResult):
                raise RuntimeError(f"the node answered {outcome}")

    async def close(self) -> None:
        for stage in self.stages.values():
            await stage.close()


def certificates(root: Path) -> None:
    init_ca(root)
    for name in ("edge", NODE):
        issue_certificate(root, name, hosts=("127.0.0.1",))


@dataclass(frozen=True)
class HopRow:
    label: str
    p50_ms: dict[str, float]  # contender -> median of every timed round trip
    ratio: dict[str, tuple[float, float, float]]  # contender -> (median, min, max) of per-round ratios to raw


@dataclass(frozen=True)
class PipeRow:
    ours: str
    raw: str
    mb_s: dict[str, float]
    ratio: tuple[float, float, float]


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


async def _timed(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return times


async def measure_hop(settings: Settings, scratch: Path) -> tuple[list[HopRow], list[PipeRow]]:
    tls_dir = scratch / "tls"
    certificates(tls_dir)
    context = multiprocessing.get_context("spawn")
    servers, contenders = [], {}
    try:
        for secure in (False, True):
            directory = str(tls_dir) if secure else None
            ours_end, theirs = context.Pipe()
            process = context.Process(target=serve_hop, args=(theirs, hop_cluster(directory), directory),
                                      name="bench-hop-server", daemon=True)
            process.start()
            servers.append((process, ours_end))
            if not ours_end.poll(120):
                raise RuntimeError("the hop server process did not start")
            node_port, frames_port, raw_port = ours_end.recv()
            names = TLS_GROUP if secure else PLAIN_GROUP
            tls = client_tls(tls_dir, "edge") if secure else None
            contenders[names[0]] = RawClient(raw_port, tls)
            contenders[names[1]] = FramesClient(frames_port, tls)
            contenders[names[2]] = OursClient(node_port, directory)
            await contenders[names[1]].start()
            await contenders[names[2]].start()
        rows = []
        for label, size in SIZES.items():
            tensor = tensor_of(size)
            for c in contenders.values():
                for _ in range(settings.warmup):
                    await c.round_trip(label, tensor)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            medians: dict[str, list[float]] = {name: [] for name in contenders}
            for r in range(settings.rounds):
                for name in alternating(list(contenders), r):
                    c = contenders[name]
                    got = await _timed(lambda c=c, label=label, tensor=tensor: c.round_trip(label, tensor),
                                       settings.messages)
                    times[name] += got
                    medians[name].append(statistics.median(got))
            ratio = {}
            for group in (PLAIN_GROUP, TLS_GROUP):
                raw = medians[group[0]]
                for name in group[1:]:
                    ratio[name] = _stats([a / b for a, b in zip(medians[name], raw)])
            rows.append(HopRow(label, {n: statistics.median(t) * 1e3 for n, t in times.items()}, ratio))
        pipes = []
        tensor = tensor_of(SIZES[PIPELINED])
        for group in (PLAIN_GROUP, TLS_GROUP):
            rates: dict[str, list[float]] = {name: [] for name in group}
            for r in range(settings.rounds):
                for name in alternating(group, r):
                    c = contenders[name]
                    seconds = statistics.median(await _timed(
                        lambda c=c: c.burst(PIPELINED, tensor, IN_FLIGHT), settings.messages))
                    rates[name].append(IN_FLIGHT * SIZES[PIPELINED] / seconds / 1e6)
            for name in group[1:]:
                pipes.append(PipeRow(name, group[0], {n: statistics.median(v) for n, v in rates.items()},
                                     _stats([a / b for a, b in zip(rates[name], rates[group[0]])])))
    finally:
        for c in contenders.values():
            await c.close()
        for process, pipe in servers:
            try:
                pipe.send("stop")
            except OSError:
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
    return rows, pipes


def report_hop(settings: Settings, rows: list[HopRow], pipes: list[PipeRow]) -> None:
    print(f"\n(1) one hop round trip on loopback, float32 (1, n); p50 ms over {settings.rounds} alternating rounds "
          f"x {settings.messages} round trips; ratio = median [min-max] of per-round ratios to raw")
    print(f"{'tensor':>8} | {'raw TCP':>8} {'ours':>8} {'ours/TCP':>18} {'frames':>8} {'frames/TCP':>18} | "
          f"{'raw TLS':>8} {'ours+tls':>8} {'ours/TLS':>18} {'frames+tls':>10} {'frames/TLS':>18}")

    def ratio(row: HopRow, name: str) -> str:
        median, low, high = row.ratio[name]
        return f"{median:.2f}x [{low:.2f}-{high:.2f}]"

    for row in rows:
        p = row.p50_ms
        print(f"{row.label:>8} | {p['tcp']:8.3f} {p['ours']:8.3f} {ratio(row, 'ours'):>18} {p['frames']:8.3f} "
              f"{ratio(row, 'frames'):>18} | {p['tls']:8.3f} {p['ours+tls']:8.3f} {ratio(row, 'ours+tls'):>18} "
              f"{p['frames+tls']:10.3f} {ratio(row, 'frames+tls'):>18}")
    for row in rows:
        if row.label in ("1 MiB", "4 MiB"):
            plain, secure = row.ratio["ours"][0], row.ratio["ours+tls"][0]
            print(f"  {row.label}: ours/TCP {plain:.2f}x ({'meets' if plain <= 1.2 else 'misses'} <= 1.2x), "
                  f"ours+tls/TLS {secure:.2f}x ({'meets' if secure <= 1.3 else 'misses'} <= 1.3x)")
    print(f"\n(2) pipelined, {IN_FLIGHT} x {PIPELINED} in flight (sends, then answers), MB/s (median of rounds); "
          f"ratio = median [min-max] of per-round throughput ratios")
    for pipe in pipes:
        low, high = pipe.ratio[1], pipe.ratio[2]
        print(f"  {LABELS[pipe.ours]:>10} {pipe.mb_s[pipe.ours]:7.0f}  vs {LABELS[pipe.raw]:>8} "
              f"{pipe.mb_s[pipe.raw]:7.0f}   {pipe.ratio[0]:.2f}x [{low:.2f}-{high:.2f}]")


# ------------------------------------------------------------------------------------------ parts 3 and 4
NODE_NAMES = ("edge", "cloud1", "cloud2")
WINDOW = 16
#: Chain runs that correct each target's slowdowns from the stage times inside the chain.
CHAIN_CALIBRATIONS = 2
STARTS: list[int] = []  # attempts each LocalCluster start needed (process mode)


def cluster_dict(slowdowns: dict[str, float], max_batch: int, package: Path | None = None) -> dict:
    """A 3-node chain on free loopback ports, raw codec, window 16."""
    nodes = [{"name": "edge", "role": "edge", "slowdown": slowdowns["edge"]}] + [
        {"name": name, "address": f"127.0.0.1:{free_port()}", "slowdown": slowdowns[name]}
        for name in NODE_NAMES[1:]]
    links = [{"from": a, "to": b, "codec": "raw"} for a, b in zip(NODE_NAMES, NODE_NAMES[1:])]
    spec = {"nodes": nodes, "links": links, "batching": {"max_batch": max_batch, "max_wait": "1ms"},
            "window": WINDOW, "message_limit": "64MiB"}
    return spec if package is None else {"package": str(package.resolve()), **spec}


def make_cluster(slowdowns: dict[str, float], max_batch: int) -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump(cluster_dict(slowdowns, max_batch))))


def write_cluster_file(directory: Path, package: Path, slowdowns: dict[str, float], max_batch: int
                       ) -> tuple[Path, ClusterSpec]:
    """A cluster file with ``package:`` and fresh ports, beside a cluster token (the default ``cluster.token``
    that ``splitexit up`` writes); validated and read the way the nodes will read it."""
    path = directory / "cluster.yaml"
    if not (directory / "cluster.token").exists():
        write_token(directory / "cluster.token")
    path.write_text(yaml.safe_dump(cluster_dict(slowdowns, max_batch, package), sort_keys=False))
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
                  dataset: TensorDataset, workdir: Path) -> ChainRun:
    """cloud1 and cloud2 as node processes (``LocalCluster``), the edge an ``Entry`` here."""
    local, cluster, attempts = start_local_cluster(
        lambda: write_cluster_file(workdir, package, slowdowns, max_batch), workdir)
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
    bare = dict.fromkeys(NODE_NAMES, 1.0)

    def chain(which: dict[str, float], max_batch: int) -> ChainRun:
        if mode == "processes":
            return run_processes(net, package, which, max_batch, dataset, workdir)
        return asyncio.run(run_in_process(net, make_cluster(which, max_batch), dataset))

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
            ceilings[max_batch].append(chain(bare, max_batch))
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
    ceiling_rows = [Ceiling(mode, b, statistics.median(r.throughput for r in rs), [r.throughput for r in rs],
                            statistics.median(r.inside["edge"][1] for r in rs), sum(r.errors for r in rs))
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
    print(f"\n(4) zero-compute ceiling ({mode}): slowdown 1 everywhere, inputs/s (median; per round), "
          f"edge mean batch rows")
    for c in ceilings:
        print(f"  max_batch {c.max_batch}: {c.throughput:7.1f}  ({', '.join(f'{t:.1f}' for t in c.rounds)}), "
              f"edge batches of {c.edge_rows:.1f} rows, errors {c.errors}")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and inputs")
    parser.add_argument("--stage-ms", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                        help="batch-1 stage times of part 3 (default 1 3 10)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="max_batch values of parts 3-4")
    parser.add_argument("--skip-hop", action="store_true", help="only parts 3 and 4")
    parser.add_argument("--skip-chain", action="store_true", help="only parts 1 and 2")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--processes", dest="mode", action="store_const", const="processes",
                      help="parts 3-4 with cloud1 and cloud2 as node processes (the default)")
    mode.add_argument("--in-process", dest="mode", action="store_const", const="in-process",
                      help="parts 3-4 with all nodes in this process")
    mode.add_argument("--both", dest="mode", action="store_const", const="both", help="parts 3-4 in both modes")
    parser.set_defaults(mode="processes")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# bench/transport.py, {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}: {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
          + (f", load average {load[0]:.2f}" if load else ""))
    print(f"# python {platform.python_version()}, torch {torch.__version__} (1 thread), grpcio {grpc.__version__}, "
          f"{'--quick' if args.quick else 'full'}: {settings}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-") as tmp:
        if not args.skip_hop:
            rows, pipes = asyncio.run(measure_hop(settings, Path(tmp)))
            report_hop(settings, rows, pipes)
            print(f"  (parts 1-2: {time.perf_counter() - started:.0f} s)")
        if not args.skip_chain:
            package = Path(tmp) / "digits_pkg"
            net = digits_package(package)
            for mode_name in ("processes", "in-process") if args.mode == "both" else (args.mode,):
                results, ceilings = measure_chains(settings, args.stage_ms, args.max_batch, mode_name, net, package,
                                                   Path(tmp))
                report_chains(settings, mode_name, results, ceilings)
    if STARTS:
        print(f"process mode: {len(STARTS)} cluster starts, {sum(STARTS) - len(STARTS)} retried "
              f"(a node died before it was ready; its log went to stderr)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"total {time.perf_counter() - started:.0f} s" + (f", load average {load[0]:.2f}" if load else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
