"""A node's Prometheus metrics, in a registry of its own (several nodes may share a process in tests)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["NodeMetrics"]

#: Metrics are served on loopback only: put a proxy in front to scrape them from elsewhere.
METRICS_HOST = "127.0.0.1"


class NodeMetrics:
    """Rows received, answered here, refused (by reason) and in flight, labelled with the node's name."""

    def __init__(self, node: str):
        self.node = node
        self.registry = CollectorRegistry()
        self.requests = Counter("splitexit_requests", "Rows received", ["node"],
                                registry=self.registry).labels(node=node)
        self.answered = Counter("splitexit_answered", "Rows answered by this node's exits", ["node"],
                                registry=self.registry).labels(node=node)
        self._rejected = Counter("splitexit_rejected", "Rows refused as malformed, by reason", ["node", "code"],
                                 registry=self.registry)
        self.in_flight = Gauge("splitexit_in_flight", "Rows accepted and not yet answered", ["node"],
                               registry=self.registry).labels(node=node)
        self._server: WSGIServer | None = None

    def rejected(self, code: str, rows: int = 1) -> None:
        """Count ``rows`` refused for reason ``code`` (a WireError code, ``unauthenticated``, ``wrong_peer``)."""
        self._rejected.labels(node=self.node, code=code).inc(rows)

    def serve(self, port: int) -> int:
        """Serve the metrics over HTTP on loopback ``port`` (0: a free one); returns the port."""
        self._server, _ = start_http_server(port, addr=METRICS_HOST, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
