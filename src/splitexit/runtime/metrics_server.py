"""Serves a member's ``/metrics`` page: plain HTTP on loopback, HTTPS with mutual TLS beyond it.

prometheus_client's WSGI app renders the page; the server around it is ours because the library's own
does the TLS handshake in its accepting thread, where one client that connects and says nothing stops
every scrape. Here each connection gets a thread of its own (at most ``MAX_CONNECTIONS`` at once; more
are closed at once), its handshake happens there, and a connection silent for ``SOCKET_TIMEOUT`` seconds
is dropped.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from splitexit.config import ClusterSpec, MetricsSpec
from splitexit.errors import ClusterError
from splitexit.runtime.frame_connection import server_tls

__all__ = ["MetricsServer", "serve_metrics"]

logger = logging.getLogger(__name__)

#: Seconds a scrape connection may stay silent (handshake, request line, headers) before it is dropped.
SOCKET_TIMEOUT = 5.0
#: Connections served at once; Prometheus needs one per scrape.
MAX_CONNECTIONS = 16


class MetricsServer:
    """``/metrics`` of ``registry`` on ``spec.address``; with ``tls`` (a server context that requires client
    certificates) only holders of a cluster certificate may read it."""

    def __init__(self, registry: CollectorRegistry, spec: MetricsSpec, *, tls: ssl.SSLContext | None):
        self.registry, self.spec, self.tls = registry, spec, tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.spec.host
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}/metrics"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_port)

    def start(self) -> int:
        """Listen (OSError when the address is taken or not this machine's); returns the port."""
        family = socket.AF_INET6 if ":" in self.spec.host else socket.AF_INET
        server_class = type("_Bound", (_Server,), {"address_family": family, "tls": self.tls,
                                                   "slots": threading.BoundedSemaphore(MAX_CONNECTIONS)})
        self._server = make_server(self.spec.host, self.spec.port, make_wsgi_app(self.registry),
                                   server_class=server_class, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="splitexit-metrics", daemon=True)
        self._thread.start()
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_metrics(registry: CollectorRegistry, spec: MetricsSpec, cluster: ClusterSpec, name: str) -> MetricsServer:
    """Start member ``name``'s ``/metrics`` server as the cluster file asks (ClusterError if it cannot listen)."""
    tls = None
    if not spec.loopback:
        assert cluster.security.tls, "the cluster file's check refuses metrics beyond loopback without TLS"
        tls = server_tls(Path(cluster.security.tls), name)
    server = MetricsServer(registry, spec, tls=tls)
    try:
        server.start()
    except OSError as exc:
        raise ClusterError(f"{name} cannot serve its metrics on {spec.address} ({exc.strerror}): give {name}'s "
                           "`metrics: {address: HOST:PORT}` another port in the cluster file, or port 0 for a free "
                           "one") from exc
    logger.info("%s serves its metrics at %s", name, server.url)
    return server


class _Server(ThreadingWSGIServer):
    tls: ssl.SSLContext | None = None
    slots: threading.BoundedSemaphore  # set per server by MetricsServer.start

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(SOCKET_TIMEOUT)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            secured = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # no certificate of the cluster CA, or silence: nothing is read
            logger.info("metrics: refused %s: %s", client_address[0], exc)
            return
        try:
            super().finish_request(secured, client_address)
        finally:
            secured.close()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged (one every few seconds, forever)."""
