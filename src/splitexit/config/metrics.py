"""Where a node (or the edge) serves its Prometheus ``/metrics`` (`metrics:` on a node of the cluster file).

On a loopback address the page is plain HTTP. Anywhere else it carries node names, rates and plan ids to
whoever can reach the port, so the cluster file must set ``security.tls``: the page is then served over
HTTPS with the node's certificate, and only a client holding a certificate of the cluster CA may read it
(``docs/metrics.md`` shows a Prometheus scrape configuration for that).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from splitexit.config.base import SpecModel
from splitexit.hosts import is_loopback

__all__ = ["DEFAULT_METRICS_HOST", "MetricsSpec"]

#: The host of ``metrics: {address: PORT}`` and of ``metrics: {}``.
DEFAULT_METRICS_HOST = "127.0.0.1"
_ADDRESS = re.compile(r"^(?:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):)?([0-9]{1,5})$")


class MetricsSpec(SpecModel):
    """``address``: ``HOST:PORT`` (port 0: any free one; the node logs which). Default: loopback, any port."""

    address: str = Field(f"{DEFAULT_METRICS_HOST}:0", description="HOST:PORT the /metrics page is served on "
                         "(a bare PORT means loopback); beyond loopback the cluster needs security.tls")

    @field_validator("address", mode="before")
    @classmethod
    def _host_port(cls, value: object) -> str:
        text = str(value).strip()
        match = _ADDRESS.match(text)
        if match is None or int(match.group(2)) > 65535:
            raise ValueError(f"metrics address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9100, or 0.0.0.0:9100 "
                             "with security.tls); port 0 picks a free one")
        return f"{match.group(1) or DEFAULT_METRICS_HOST}:{int(match.group(2))}"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)
