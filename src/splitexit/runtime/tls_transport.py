"""Mutual TLS for frame connections on a non-blocking :class:`ssl.SSLSocket`, without asyncio's SSL layer.

asyncio's SSL transport encrypts into a memory BIO, copies the BIO's bytes out and hands them to a
second transport, which may buffer them again: at 4 MiB a frame cost 1.4x a raw TLS socket. Here OpenSSL
reads and writes the socket itself: ``send`` encrypts straight from the payload's memory, ``recv_into``
decrypts straight into the frame reader's buffer. :class:`TLSTransport` drives an
:class:`asyncio.BufferedProtocol` (a :class:`~splitexit.runtime.frame_connection.FrameConnection`)
through the loop's public ``add_reader``/``add_writer``; :func:`open_tls` and :func:`accept_tls` make
one after the handshake.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["TLSTransport", "accept_tls", "open_tls"]

#: Bytes handed to one ``SSLSocket.send`` (OpenSSL then writes whole records of up to 16 KiB).
SEND_CHUNK = 256 * 1024
#: Seconds the TLS handshake may take.
HANDSHAKE_TIMEOUT = 10.0

Buffer = bytes | bytearray | memoryview


async def _handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    async with asyncio.timeout(timeout):
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await _ready(fd, loop.add_reader, loop.remove_reader)
            except ssl.SSLWantWriteError:
                await _ready(fd, loop.add_writer, loop.remove_writer)


async def _ready(fd: int, watch: Callable[..., None], unwatch: Callable[[int], object]) -> None:
    """Wait until the loop reports ``fd`` ready (``watch``: the loop's add_reader or add_writer)."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    watch(fd, ready.set_result, None)
    try:
        await ready
    finally:
        unwatch(fd)


async def open_tls(host: str, port: int, context: ssl.SSLContext, server_name: str,
                   protocol: asyncio.BufferedProtocol) -> TLSTransport:
    """Connect, check the server's certificate names ``server_name``, and start ``protocol`` on it."""
    loop = asyncio.get_running_loop()
    raw = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    raw.setblocking(False)
    try:
        await loop.sock_connect(raw, (host, port))
        sock = context.wrap_socket(raw, server_hostname=server_name, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        await _handshake(sock, HANDSHAKE_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return TLSTransport(sock, protocol, context)


async def accept_tls(raw: socket.socket, context: ssl.SSLContext, protocol: asyncio.BufferedProtocol,
                     timeout: float = HANDSHAKE_TIMEOUT) -> TLSTransport:
    """Take an accepted socket through the server side of the handshake and start ``protocol`` on it."""
    raw.setblocking(False)
    sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    try:
        await _handshake(sock, timeout)
    except BaseException:
        sock.close()
        raise
    return TLSTransport(sock, protocol, context)


class TLSTransport(asyncio.Transport):
    """One TLS connection: reads into the protocol's buffers, writes queued buffers as the socket takes them."""

    def __init__(self, sock: ssl.SSLSocket, protocol: asyncio.BufferedProtocol, context: ssl.SSLContext):
        super().__init__()
        self._sock, self._protocol, self._context = sock, protocol, context
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self._high, self._low = 4 * 1024 * 1024, 1024 * 1024
        self._writing_paused = False
        self._reading = True
        self._closing = False
        self._lost = False
        self._writer_on = False
        self._extra: dict[str, Any] = {"socket": sock, "sslcontext": context, "peercert": sock.getpeercert(),
                                       "peername": sock.getpeername(), "sockname": sock.getsockname()}
        protocol.connection_made(self)
        self._loop.add_reader(self._fd, self._on_readable)

    # ---------------------------------------------------------------- asyncio.Transport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else self._high // 4

    def get_write_buffer_size(self) -> int:
        return self._queued

    def pause_reading(self) -> None:
        if self._reading and not self._lost:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._lost:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
            self._loop.call_soon(self._on_readable)  # OpenSSL may hold decrypted bytes the selector cannot see

    def is_reading(self) -> bool:
        return self._reading

    def write(self, data: Buffer) -> None:
        self.writelines([data])

    def writelines(self, list_of_data: Iterable[Buffer]) -> None:
        if self._closing:
            return
        for data in list_of_data:
            view = memoryview(data).cast("B")
            if view.nbytes:
                self._queue.append(view)
                self._queued += view.nbytes
        self._flush()
        if self._queued > self._high and not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send what is queued, then close."""
        self._closing = True
        if not self._queue:
            self._lose(None)

    def abort(self) -> None:
        self._closing = True
        self._lose(None)

    # ---------------------------------------------------------------- the socket
    def _on_readable(self) -> None:
        while self._reading and not self._lost:
            buffer = self._protocol.get_buffer(-1)
            try:
                count = self._sock.recv_into(buffer)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return
            except ssl.SSLWantWriteError:
                return  # a renegotiation wants to write first; the next readable event retries
            except (OSError, ssl.SSLError) as exc:
                self._lose(exc)
                return
            if count == 0:
                self._closing = True
                self._lose(None)
                return
            self._protocol.buffer_updated(count)

    def _flush(self) -> None:
        while self._queue and not self._lost:
            head = self._queue[0]
            piece = head[:SEND_CHUNK]
            try:
                sent = self._sock.send(piece)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                self._watch_writable()
                return
            except (OSError, ssl.SSLError) as exc:
                self._lose(exc)
                return
            self._queued -= sent
            if sent >= head.nbytes:
                self._queue.popleft()
            else:
                self._queue[0] = head[sent:]
        self._unwatch_writable()
        if self._writing_paused and self._queued <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._closing and not self._queue:
            self._lose(None)

    def _watch_writable(self) -> None:
        if not self._writer_on:
            self._loop.add_writer(self._fd, self._flush)
            self._writer_on = True

    def _unwatch_writable(self) -> None:
        if self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False

    def _lose(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._unwatch_writable()
        if self._reading:
            self._loop.remove_reader(self._fd)
        self._queue.clear()
        self._queued = 0
        self._sock.close()
        on_lost: Callable[[Exception | None], None] = self._protocol.connection_lost
        self._loop.call_soon(on_lost, exc if isinstance(exc, Exception) else None)
