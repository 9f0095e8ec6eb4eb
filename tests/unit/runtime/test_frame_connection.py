"""Frame connections on real loopback sockets, plain and mutual TLS: frames arrive whole and in order,
names are proven, a peer that speaks something else is cut off, and a slow reader holds the sender back."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from splitexit.errors import WireError
from splitexit.runtime.frame_connection import (
    HIGH_WATER,
    FrameConnection,
    client_tls,
    connect,
    serve,
    server_tls,
)
from splitexit.runtime.security import init_ca, issue_certificate
from splitexit.wire.framing import FrameLimits, FrameType

LIMITS = FrameLimits(payload=16 << 20)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ours, theirs = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("other")
    for root in (ours, theirs):
        init_ca(root)
        for name in ("edge", "cloud1"):
            issue_certificate(root, name)
    return ours, theirs


async def echo_server(tls: ssl.SSLContext | None, seen: list) -> tuple[asyncio.Server, int]:
    async def handle(connection: FrameConnection) -> None:
        seen.append(connection.peer_name)
        try:
            while True:
                frame = await connection.receive()
                await connection.send(FrameType.RESULTS, frame.metadata + bytes(frame.payload[:8]),
                                      batch_id=frame.batch_id)
        except (ConnectionError, WireError) as exc:
            seen.append(exc)

    server = await serve("127.0.0.1", 0, handle, tls=tls, limits=LIMITS)
    return server, server.port


@pytest.mark.parametrize("secured", [False, True], ids=["plain", "mtls"])
def test_frames_of_every_size_arrive_whole_and_in_order(secured: bool, pki: tuple[Path, Path]) -> None:
    ours, _ = pki
    payloads = [b"", b"x" * 10, bytes(range(256)) * 4096, b"\x07" * (4 << 20) + b"end"]

    async def main() -> tuple[list, list]:
        seen: list = []
        server, port = await echo_server(server_tls(ours, "cloud1") if secured else None, seen)
        client = await connect("127.0.0.1", port, tls=client_tls(ours, "edge") if secured else None,
                               server_name="cloud1", limits=LIMITS)
        for i, payload in enumerate(payloads):
            await client.send(FrameType.BATCH, f"m{i}".encode(), [payload], batch_id=i)
        answers = [await client.receive() for _ in payloads]
        await client.close()
        server.close()
        return [(a.batch_id, a.metadata) for a in answers], seen

    answers, seen = asyncio.run(main())
    assert answers == [(i, f"m{i}".encode() + p[:8]) for i, p in enumerate(payloads)]
    assert seen[0] == ("edge" if secured else None)  # the server knows who called, from the certificate


def test_a_certificate_from_another_ca_or_for_another_name_gets_no_connection(pki: tuple[Path, Path]) -> None:
    ours, theirs = pki

    async def attempt(tls: ssl.SSLContext, server_name: str) -> str:
        seen: list = []
        server, port = await echo_server(server_tls(ours, "cloud1"), seen)
        try:
            connection = await connect("127.0.0.1", port, tls=tls, server_name=server_name)
            await connection.send(FrameType.CREDIT)
            await connection.receive()
            return "connected"
        except (ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__
        finally:
            server.close()

    assert asyncio.run(attempt(client_tls(theirs, "edge"), "cloud1")) != "connected"  # foreign CA
    assert asyncio.run(attempt(client_tls(ours, "edge"), "cloud2")) != "connected"  # not the node we meant


def test_a_peer_speaking_another_protocol_is_cut_off_with_the_reason() -> None:
    async def main() -> list:
        seen: list = []
        server, port = await echo_server(None, seen)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
        await writer.drain()
        assert await reader.read() == b""  # the node hung up
        writer.close()
        server.close()
        return seen

    seen = asyncio.run(main())
    assert isinstance(seen[-1], WireError) and "not a splitexit frame" in str(seen[-1])


def test_a_reader_that_does_not_read_holds_the_sender_back() -> None:
    async def main() -> tuple[int, int]:
        stalled = asyncio.Event()

        async def never_read(connection: FrameConnection) -> None:
            await stalled.wait()

        server = await serve("127.0.0.1", 0, never_read, limits=LIMITS)
        port = server.port
        client = await connect("127.0.0.1", port, limits=LIMITS)
        chunk, sent = bytes(1 << 20), 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await client.send(FrameType.BATCH, b"", [chunk])
                sent += 1

        task = asyncio.get_running_loop().create_task(flood())
        await asyncio.sleep(1.0)
        task.cancel()
        queued = client._writer.queued if client._writer else 0
        stalled.set()
        client.transport.abort()  # type: ignore[union-attr]
        server.close()
        return sent, queued

    sent, queued = asyncio.run(main())
    # the server's receive queue stops reading, the kernel buffers fill, then the sender waits: bounded
    assert sent < 64, f"{sent} MiB went out to a reader that never reads"
    assert queued <= HIGH_WATER + (1 << 20) + 4096
