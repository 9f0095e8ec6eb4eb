"""gRPC channel and server options of the control RPCs (Assign, PutStage, Health, Profile, Probe)."""

from __future__ import annotations

__all__ = ["CLIENT_KEEPALIVE", "HEADER_ROOM", "RECONNECT_OPTIONS", "SERVER_KEEPALIVE", "SERVER_OWN_PORT",
           "grpc_options"]

#: Room left in a control message for everything but its bulk data (stage chunks, probe payloads).
HEADER_ROOM = 64 * 1024

#: gRPC's reconnect back-off grows to 120 s by default: a channel that saw its peer go away would fail calls
#: fast for that long after the peer came back (a restarted node, a restarted etcd). Ours retries within a
#: second; callers keep their own, longer back-off on top.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
#: Every channel pings its peer after this many ms without traffic and gives the connection up when no
#: answer comes within the timeout: a peer that froze (SIGSTOP, a dead host) breaks its streams, so their
#: rows are resubmitted, instead of holding them until TCP notices.
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 10_000, 5_000
CLIENT_KEEPALIVE = [("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
#: A server accepts those pings (by default gRPC servers refuse pings more often than every 5 minutes).
SERVER_KEEPALIVE = [("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
                    ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS)]
#: A node's port is its own: without this, gRPC sets SO_REUSEPORT and a second node on a used port starts,
#: says it is ready, and silently shares the port with the first.
SERVER_OWN_PORT = [("grpc.so_reuseport", 0)]


def grpc_options(message_limit: int) -> list[tuple[str, int]]:
    """Explicit message limits (gRPC's 4 MiB default would refuse large activations silently)."""
    return [("grpc.max_send_message_length", message_limit), ("grpc.max_receive_message_length", message_limit)]
