"""One TCP (or mutual-TLS) connection carrying frames (``wire/framing.py``), on asyncio.

The receive side is an :class:`asyncio.BufferedProtocol`: the transport reads straight into the buffer
the :class:`~splitexit.wire.framing.FrameReader` hands out, so a payload is read into its own buffer once
and never copied. In plain TCP the send side hands header, metadata and payload to ``sendmsg`` from their
own memory (:class:`_SocketWriter`; asyncio's ``writelines`` joins them into one copy and buffers the
rest in another); under TLS the transport is :class:`~splitexit.runtime.tls_transport.TLSTransport`,
where OpenSSL encrypts from the payload's memory and decrypts into the reader's buffer. Either way ``send``
waits while more than ``HIGH_WATER`` bytes are unsent, so a slow reader holds the sender back instead of
filling memory. A payload handed to ``send`` must not change until ``send`` returns.
Sockets get ``TCP_NODELAY``, keepalive and ``TCP_USER_TIMEOUT``, so a peer that vanished breaks the
connection within seconds. TLS is :mod:`ssl` with the cluster CA; the client checks the server's name,
and the server reads the client's name from its certificate (:attr:`FrameConnection.peer_name`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from splitexit.errors import WireError
from splitexit.runtime.security import CA_CERT
from splitexit.runtime.tls_transport import accept_tls, open_tls
from splitexit.wire.framing import Frame, FrameLimits, FrameReader, FrameType, frame_header

__all__ = ["FrameConnection", "FrameServer", "client_tls", "connect", "serve", "server_tls"]

#: Keepalive probes after this many idle seconds, then every ``KEEPALIVE_INTERVAL`` s, ``KEEPALIVE_COUNT`` times.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
#: Milliseconds sent data may stay unacknowledged before the kernel gives the connection up.
USER_TIMEOUT_MS = 20_000
#: Bytes buffered by the transport before the sender waits (and resumes below a quarter of it).
HIGH_WATER = 4 * 1024 * 1024
#: Frames received and not yet taken by the owner before the connection stops reading.
MAX_QUEUED_FRAMES = 8
#: Buffers one ``sendmsg`` call takes at most (Linux's IOV_MAX is 1024).
MAX_IOVECS = 512

Buffer = bytes | bytearray | memoryview


class FrameConnection(asyncio.BufferedProtocol):
    """Frames in (``receive``) and out (``send``) over one transport; the first error closes it for good."""

    def __init__(self, limits: FrameLimits | None = None,
                 on_made: Callable[[FrameConnection], None] | None = None,
                 payload_buffer: Callable[[int], memoryview] | None = None):
        self.reader = FrameReader(limits or FrameLimits(), payload_buffer=payload_buffer)
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.peer_name: str | None = None
        self.error: BaseException | None = None
        self._frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.get_running_loop().create_future()
        self._reading = True
        self._writer: _SocketWriter | None = None

    # ---------------------------------------------------------------- asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        wrapped = transport.get_extra_info("socket")
        _tune(wrapped)
        raw = getattr(wrapped, "_sock", None)  # asyncio's TransportSocket wraps the real socket
        loop = asyncio.get_running_loop()
        if transport.get_extra_info("sslcontext") is None and isinstance(raw, socket.socket) \
                and hasattr(loop, "_add_writer"):  # the selector loop's own writer hook (the one Dask uses too)
            self._writer = _SocketWriter(raw, self._writable, self._fail)
        self.peer_name = _certificate_name(transport.get_extra_info("peercert"))
        if self._on_made is not None:  # after the TLS handshake, which a failed one never reaches
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.reader.filled(nbytes)
        except WireError as exc:
            self._fail(exc)
            return
        for frame in frames:
            self._frames.put_nowait(frame)
        if self._frames.qsize() >= MAX_QUEUED_FRAMES and self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None and exc is not None:
            self.error = exc
        if self._writer is not None:
            self._writer.abandon()
        self._writable.set()
        self._frames.put_nowait(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---------------------------------------------------------------- the owner's side
    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def send(self, kind: FrameType, metadata: Buffer = b"", payload: Sequence[Buffer] = (), *,
                   batch_id: int = 0, deadline: float = 0.0) -> None:
        """Write one frame; waits while the peer reads slower than we write. Raises ConnectionError once closed."""
        size = sum(memoryview(part).nbytes for part in payload)
        header = frame_header(kind, batch_id=batch_id, deadline=deadline, metadata_size=len(metadata),
                              payload_size=size)
        await self._write([header, metadata, *payload])

    async def send_all(self, frames: Sequence[tuple[FrameType, int, Buffer]]) -> None:
        """Write frames of (type, batch id, metadata) and no payload in one go (one system call), as
        :meth:`send` would one by one."""
        buffers: list[Buffer] = []
        for kind, batch_id, metadata in frames:
            buffers += [frame_header(kind, batch_id=batch_id, metadata_size=len(metadata)), metadata]
        await self._write(buffers)

    async def _write(self, buffers: list[Buffer]) -> None:
        if self.transport is None or self.closed or self.transport.is_closing():
            raise ConnectionError(f"the connection is closed ({self.error or 'by its owner'})")
        if self._writer is not None:
            self._writer.write(buffers)
        else:
            self.transport.writelines(buffers)
        if not self._writable.is_set():
            await self._writable.wait()

    async def receive(self) -> Frame:
        """The next frame; raises ConnectionError (or the WireError that broke the stream) once closed."""
        frame = await self._frames.get()
        if frame is None:
            self._frames.put_nowait(None)  # every later receive ends the same way
            if isinstance(self.error, WireError):
                raise self.error
            raise ConnectionError(f"the connection closed ({self.error or 'by the peer'})")
        if not self._reading and self._frames.qsize() < MAX_QUEUED_FRAMES // 2 and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()
        return frame

    async def close(self) -> None:
        if self._writer is not None and not self.closed:
            await self._writer.drained()  # what was sent goes out before the close
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.transport is not None:
            await self._closed

    def _fail(self, error: BaseException) -> None:
        self.error = error
        if self.transport is not None:
            self.transport.abort()


class _SocketWriter:
    """Sends lists of buffers with ``sendmsg`` from their own memory; what the socket does not take now is
    kept, in order, and sent when it is writable again. ``writable`` is clear while more than
    ``HIGH_WATER`` bytes wait. It watches the socket through the selector loop's ``_add_writer``: the public
    ``add_writer`` refuses a socket that a transport owns, and the transport here only reads."""

    def __init__(self, sock: socket.socket, writable: asyncio.Event, on_error: Callable[[BaseException], None]):
        self.sock, self.writable, self.on_error = sock, writable, on_error
        self.loop = asyncio.get_running_loop()
        self.queue: deque[memoryview] = deque()
        self.queued = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self._watching = False

    def write(self, buffers: Sequence[Buffer]) -> None:
        views = [view for view in (memoryview(b).cast("B") for b in buffers) if view.nbytes]
        waiting = bool(self.queue)
        self.queue.extend(views)
        self.queued += sum(v.nbytes for v in views)
        self._empty.clear()
        if not waiting:
            self._flush()
            if self.queue:
                self.loop._add_writer(self.sock.fileno(), self._flush)  # type: ignore[attr-defined]
                self._watching = True
        if self.queued > HIGH_WATER:
            self.writable.clear()

    def _flush(self) -> None:
        while self.queue:
            try:
                sent = self.sock.sendmsg(list(islice(self.queue, MAX_IOVECS)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.abandon()
                self.on_error(exc)
                return
            self.queued -= sent
            while sent:
                head = self.queue[0]
                if head.nbytes <= sent:
                    sent -= head.nbytes
                    self.queue.popleft()
                else:
                    self.queue[0], sent = head[sent:], 0
            if self.queued <= HIGH_WATER // 4:
                self.writable.set()
        self._unwatch()
        self.writable.set()
        self._empty.set()

    def _unwatch(self) -> None:
        if self._watching:
            self.loop._remove_writer(self.sock.fileno())  # type: ignore[attr-defined]
            self._watching = False

    async def drained(self) -> None:
        await self._empty.wait()

    def abandon(self) -> None:
        """The connection is gone: drop what waits, wake every waiting sender."""
        self._unwatch()
        self.queue.clear()
        self.queued = 0
        self.writable.set()
        self._empty.set()


async def connect(host: str, port: int, *, tls: ssl.SSLContext | None = None, server_name: str | None = None,
                  limits: FrameLimits | None = None) -> FrameConnection:
    """Open a connection to ``host:port``; with ``tls`` the server's certificate must name ``server_name``."""
    if tls is not None:
        protocol = FrameConnection(limits)
        await open_tls(host, port, tls, server_name or host, protocol)
        return protocol
    _, plain = await asyncio.get_running_loop().create_connection(lambda: FrameConnection(limits), host, port)
    return plain


class FrameServer:
    """Where a :func:`serve` listens; ``close`` stops accepting (connections already made go on)."""

    def __init__(self, port: int, close: Callable[[], None]):
        self.port = port
        self._close = close

    def close(self) -> None:
        self._close()


async def serve(host: str, port: int, handle: Callable[[FrameConnection], Awaitable[None]], *,
                tls: ssl.SSLContext | None = None, limits: FrameLimits | None = None,
                payload_buffer: Callable[[int], memoryview] | None = None) -> FrameServer:
    """Accept connections on ``host:port`` (0: a free port); ``handle`` runs once per connection (with TLS,
    once its handshake is done). ``payload_buffer`` allocates what large payloads are read into."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def run(connection: FrameConnection) -> None:
        try:
            await handle(connection)
        except ConnectionError:
            pass  # the peer went away: nothing to answer, and not worth a traceback per connection
        finally:
            await connection.close()

    def made(connection: FrameConnection) -> None:
        spawn(run(connection))

    if tls is None:
        server = await loop.create_server(lambda: FrameConnection(limits, made, payload_buffer), host, port,
                                          reuse_port=False)
        return FrameServer(int(server.sockets[0].getsockname()[1]), server.close)
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setblocking(False)

    async def handshake(raw: socket.socket) -> None:
        try:
            await accept_tls(raw, tls, FrameConnection(limits, made, payload_buffer))
        except (OSError, ssl.SSLError, TimeoutError):
            raw.close()  # not one of ours, or too slow to prove it: the handshake failed, nothing else to do

    async def accept_forever() -> None:
        try:
            while True:
                raw, _ = await loop.sock_accept(listener)
                spawn(handshake(raw))
        finally:
            listener.close()

    accepting = loop.create_task(accept_forever())

    def stop_accepting() -> None:
        accepting.cancel()

    return FrameServer(int(listener.getsockname()[1]), stop_accepting)


def client_tls(directory: Path, name: str) -> ssl.SSLContext:
    """TLS for a node that connects: its own certificate, and servers checked against the cluster CA by name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(directory / CA_CERT))
    context.load_cert_chain(directory / f"{name}.pem", directory / f"{name}.key")
    return context


def server_tls(directory: Path, name: str) -> ssl.SSLContext:
    """TLS for a node that accepts: its own certificate; clients must present one from the cluster CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(directory / CA_CERT))
    context.load_cert_chain(directory / f"{name}.pem", directory / f"{name}.key")
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _tune(sock: socket.socket | None) -> None:
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, option):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _certificate_name(certificate: object) -> str | None:
    """The node name a verified peer certificate carries (its first DNS name, else its CN); None without TLS."""
    if not isinstance(certificate, dict):
        return None
    for kind, value in certificate.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
