"""Parts 1 and 2 of bench/transport.py: one hop round trip and pipelined throughput, ours vs raw sockets
(the contenders and how they are timed are in bench/transport.py's docstring)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import secrets
import socket
import ssl
import statistics
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitexit.config import ClusterSpec
from splitexit.config.codec_names import parse_codec
from splitexit.control.local_cluster import free_port
from splitexit.runtime.frame_connection import FrameConnection, client_tls, connect, serve, server_tls
from splitexit.runtime.hop import RowResult
from splitexit.runtime.node import Node, Served
from splitexit.runtime.remote import RemoteStage
from splitexit.runtime.security import NodeCredentials, init_ca, issue_certificate
from splitexit.tensors import TensorInfo
from splitexit.wire.data_messages import encode_tensors
from splitexit.wire.framing import FrameLimits, FrameType
from transport_common import SEED, Settings

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

