"""Benchmark: the frame transport (``wire/framing.py`` + ``runtime/frame_connection.py``) against raw sockets.

One hop, on loopback, one float32 tensor at 64 KiB, 1 MiB and 4 MiB, four contenders side by side:

* *tcp*: blocking sockets, an 8-byte length prefix then the tensor's bytes from its own memory; the server
  thread ``recv_into`` a preallocated buffer, wraps it with ``torch.frombuffer`` and answers 8 bytes.
* *frames*: a :class:`FrameConnection` from this process's event loop to a server with its own event loop
  in a thread: a BATCH frame (a 64-byte metadata block, the tensor's bytes as the payload), the server
  wraps the received payload with ``torch.frombuffer`` and answers a RESULTS frame.
* *tls*: *tcp* over :mod:`ssl` sockets with the cluster CA and client certificates (mutual TLS).
* *frames+tls*: *frames* with mutual TLS (``client_tls``/``server_tls``, certificates from ``splitexit certs``).

Each round runs every contender for ``messages`` round trips (the order rotates every round); the ratio
of two contenders is the median over rounds of the ratio of their per-round medians. Then pipelined: 4
frames in flight at 1 MiB, throughput (MB/s) of *frames* vs *tcp* doing the same (4 sends, then 4 reads).

Run ``.venv/bin/python bench/frames.py`` (``--quick``: fewer rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from splitexit.runtime.frame_connection import FrameConnection, client_tls, connect, serve, server_tls
from splitexit.runtime.security import init_ca, issue_certificate
from splitexit.wire.framing import FrameLimits, FrameType

SIZES = {"64 KiB": 64 * 1024, "1 MiB": 1 << 20, "4 MiB": 4 << 20}
LIMITS = FrameLimits(payload=64 << 20)
PREFIX = struct.Struct("!Q")
METADATA = bytes(64)
IN_FLIGHT = 4


def tensor_of(size: int) -> torch.Tensor:
    return torch.randn(size // 4, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ raw sockets
def raw_server(listener: socket.socket, wrap: Callable[[socket.socket], socket.socket]) -> None:
    conn, _ = listener.accept()
    conn = wrap(conn)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    try:
        while True:
            head = _recv_exact(conn, view, PREFIX.size)
            if head is None:
                return
            (size,) = PREFIX.unpack(head)
            if _recv_exact(conn, view, size) is None:
                return
            torch.frombuffer(buffer, dtype=torch.float32, count=size // 4)
            conn.sendall(PREFIX.pack(size))
    finally:
        conn.close()


def _recv_exact(conn: socket.socket, view: memoryview, size: int) -> memoryview | None:
    got = 0
    while got < size:
        n = conn.recv_into(view[got:size])
        if n == 0:
            return None
        got += n
    return view[:size]


class RawClient:
    def __init__(self, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None):
        listener = socket.create_server(("127.0.0.1", 0))
        server_wrap: Callable[[socket.socket], socket.socket] = \
            (lambda s: tls[1].wrap_socket(s, server_side=True)) if tls else (lambda s: s)
        threading.Thread(target=raw_server, args=(listener, server_wrap), daemon=True).start()
        sock = socket.create_connection(listener.getsockname())
        self.sock = tls[0].wrap_socket(sock, server_hostname="cloud1") if tls else sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = memoryview(bytearray(PREFIX.size))

    def send(self, tensor: torch.Tensor) -> None:
        data = memoryview(tensor.numpy()).cast("B")
        self.sock.sendall(PREFIX.pack(data.nbytes))
        self.sock.sendall(data)

    def read(self) -> None:
        _recv_exact(self.sock, self.reply, PREFIX.size)


# ------------------------------------------------------------------------------------------ frames
async def echo(connection: FrameConnection) -> None:
    try:
        while True:
            frame = await connection.receive()
            torch.frombuffer(frame.payload, dtype=torch.float32)
            await connection.send(FrameType.RESULTS, b"ok", batch_id=frame.batch_id)
    except ConnectionError:
        return


class FrameServer:
    """A frame server on its own event loop in a thread, as a separate node would have."""

    def __init__(self, tls: ssl.SSLContext | None):
        self.port = 0
        ready = threading.Event()

        async def main() -> None:
            server = await serve("127.0.0.1", 0, echo, tls=tls, limits=LIMITS)
            self.port = server.port
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        ready.wait()


class FrameClient:
    def __init__(self, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None):
        self.server = FrameServer(tls[1] if tls else None)
        self.tls = tls[0] if tls else None
        self.connection: FrameConnection | None = None
        self.next_id = 0

    async def start(self) -> None:
        self.connection = await connect("127.0.0.1", self.server.port, tls=self.tls, server_name="cloud1",
                                        limits=LIMITS)

    async def send(self, tensor: torch.Tensor) -> None:
        assert self.connection is not None
        self.next_id += 1
        await self.connection.send(FrameType.BATCH, METADATA, [memoryview(tensor.numpy()).cast("B")],
                                   batch_id=self.next_id)

    async def read(self) -> None:
        assert self.connection is not None
        await self.connection.receive()


# ------------------------------------------------------------------------------------------ measuring
async def timed(send: Callable[[torch.Tensor], Awaitable[None] | None], read: Callable[[], Awaitable[None] | None],
                tensor: torch.Tensor, count: int, in_flight: int = 1) -> list[float]:
    async def call(f: Callable, *args: object) -> None:
        result = f(*args)
        if asyncio.iscoroutine(result):
            await result

    times = []
    for _ in range(count):
        started = time.perf_counter()
        for _ in range(in_flight):
            await call(send, tensor)
        for _ in range(in_flight):
            await call(read)
        times.append(time.perf_counter() - started)
    return times


def certificates(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    init_ca(root)
    for name in ("edge", "cloud1"):
        issue_certificate(root, name)
    return client_tls(root, "edge"), server_tls(root, "cloud1")


async def main(rounds: int, messages: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tls = certificates(Path(scratch))
        frames, frames_tls = FrameClient(None), FrameClient(tls)
        await frames.start()
        await frames_tls.start()
        contenders = {"tcp": RawClient(None), "frames": frames, "tls": RawClient(tls), "frames+tls": frames_tls}
        print(f"# bench/frames.py on {platform.node()} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
        print(f"one hop round trip, median ms over {rounds} rounds x {messages} messages; ratio = median of "
              "per-round ratios")
        print(f"{'size':>8} {'tcp':>8} {'frames':>8} {'ratio':>7} {'tls':>8} {'frames+tls':>11} {'ratio':>7}")
        for label, size in SIZES.items():
            tensor = tensor_of(size)
            per_round: dict[str, list[float]] = {name: [] for name in contenders}
            for c in contenders.values():  # warm up
                await timed(c.send, c.read, tensor, 5)
            for r in range(rounds):
                names = list(contenders)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    c = contenders[name]
                    per_round[name].append(statistics.median(await timed(c.send, c.read, tensor, messages)))
            ms = {name: statistics.median(v) * 1e3 for name, v in per_round.items()}
            plain = statistics.median(a / b for a, b in zip(per_round["frames"], per_round["tcp"]))
            secure = statistics.median(a / b for a, b in zip(per_round["frames+tls"], per_round["tls"]))
            print(f"{label:>8} {ms['tcp']:8.3f} {ms['frames']:8.3f} {plain:6.2f}x {ms['tls']:8.3f} "
                  f"{ms['frames+tls']:11.3f} {secure:6.2f}x")
        tensor = tensor_of(SIZES["1 MiB"])
        print(f"pipelined, {IN_FLIGHT} x 1 MiB in flight: MB/s")
        for a, b in (("frames", "tcp"), ("frames+tls", "tls")):
            ratios, rates = [], {a: [], b: []}  # type: ignore[var-annotated]
            for _ in range(rounds):
                for name in (a, b):
                    c = contenders[name]
                    seconds = statistics.median(await timed(c.send, c.read, tensor, messages, IN_FLIGHT))
                    rates[name].append(IN_FLIGHT * tensor.numel() * 4 / seconds / 1e6)
                ratios.append(rates[a][-1] / rates[b][-1])
            print(f"{a:>11} {statistics.median(rates[a]):8.0f}  {b:>4} {statistics.median(rates[b]):8.0f}  "
                  f"throughput ratio {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    asyncio.run(main(rounds=3 if args.quick else 8, messages=10 if args.quick else 30))
