"""The data plane's limits (`data_plane:` in a cluster file): what one node accepts from its upstream
neighbours on the framed connections that carry batches and results (``docs/wire.md``).

Every limit bounds something a peer could otherwise make a node hold without end: connections, frames in
flight, bytes in flight, and time spent waiting for a sender that says nothing. ``docs/security.md``
lists them with what each one stops.
"""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_serializer, field_validator

from splitexit.config.base import SpecModel, seconds_from, written_duration
from splitexit.units import parse_size

__all__ = ["DataPlaneSpec"]


class DataPlaneSpec(SpecModel):
    """Limits of a node's data-plane server; the defaults suit a chain of a few tiers on one LAN."""

    credits: int = Field(16, ge=1, le=256, description="batches one connection may have in the node at once; the "
                                                     "sender waits for credit past it")
    node_credits: int = Field(64, ge=1, le=65536, description="batches all connections together may have in the "
                                                             "node: every connection's credits come from this pool, "
                                                             "shared fairly, at least one each")
    in_flight_bytes: int = Field(1024 * 1024 * 1024, ge=1024, description="payload bytes all connections may have "
                                                                          "in the node at once (size: 1GiB)")
    max_payload: int = Field(256 * 1024 * 1024, ge=1024, description="largest batch payload (size)")
    max_connections: int = Field(64, ge=1, description="connections the node holds at once")
    max_connections_per_host: int = Field(16, ge=1, description="connections from one address at once")
    hello_timeout: float = Field(5.0, gt=0, description="a connection that has not said HELLO by then is closed")
    idle_timeout: float = Field(600.0, gt=0, description="a connection without a frame for this long is closed "
                                                         "(senders ping well within it)")

    @field_validator("in_flight_bytes", "max_payload", mode="before")
    @classmethod
    def _size(cls, value: str | float) -> int:
        return parse_size(value)

    @field_validator("hello_timeout", "idle_timeout", mode="before")
    @classmethod
    def _duration(cls, value: str | float, info: ValidationInfo) -> float:
        return seconds_from(value, info)

    @field_serializer("hello_timeout", "idle_timeout", when_used="json")
    def _duration_out(self, seconds: float) -> str | None:
        return written_duration(seconds)
