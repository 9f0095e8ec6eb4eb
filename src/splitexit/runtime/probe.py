"""Measure one link through the runtime: its round trip and its bandwidth, as a stage's messages see them.

A probe is a ``Probe`` call whose payload travels the way a batch would: through the sender's
:class:`~splitexit.runtime.link.EmulatedLink` for that link (the cluster file's bandwidth, latency,
jitter and loss), then over the real gRPC channel; the node's short reply comes back through an emulated
link with the same figures, as results do. So a measured link includes gRPC, loopback or the real
network, and the emulation, and nothing is assumed.

Small probes give the round trip (their median). Large probes, sized to take about
:data:`LARGE_PROBE_SECONDS` at the file's bandwidth, give the bandwidth from the extra time their extra
bytes took: ``8 * (large - small) / (t_large - t_small)``. A link so fast that the two cannot be told
apart has no bandwidth figure (``None``): the planner then charges no serialisation on it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import grpc

from splitexit.config import ClusterSpec, LinkSpec
from splitexit.errors import ClusterError, NodeUnavailableError
from splitexit.runtime.control_messages import decode_probe, encode_probe
from splitexit.runtime.link import EmulatedLink
from splitexit.runtime.remote import open_channel
from splitexit.runtime.security import node_credentials, token_metadata
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.grpc_options import HEADER_ROOM

__all__ = ["ProbeResult", "measure_link"]

#: Bytes of a small probe (the round trip).
SMALL_PROBE = 256
#: A large probe takes about this long at the link's declared bandwidth ...
LARGE_PROBE_SECONDS = 0.03
#: ... within these sizes (capped further by the message limit); on a link without one, the largest.
LARGE_PROBE_BYTES = (64 * 1024, 4 * 1024 * 1024)
#: Probes of each size; the median counts.
PROBES = 5
#: Seconds one probe call may take.
PROBE_TIMEOUT = 30.0
#: The measured extra time of a large probe must exceed this share of the round trip, and ...
MIN_EXTRA_SHARE = 0.05
#: ... this many seconds, to give a bandwidth (below, the link is too fast to tell).
MIN_EXTRA_SECONDS = 1e-4
#: Seeds of the emulated links a probe travels through (fixed: runs are repeatable).
DOWN_SEED, UP_SEED = 2, 3


@dataclass(frozen=True)
class ProbeResult:
    """What a link measured: ``rtt`` seconds (a small message down, a tiny reply up) and bits per second."""

    rtt: float
    bandwidth: float | None


def _large_probe(link: LinkSpec, message_limit: int) -> int:
    low, high = LARGE_PROBE_BYTES
    high = max(low, min(high, message_limit - HEADER_ROOM))
    if link.bandwidth is None:
        return high
    return int(min(high, max(low, link.bandwidth * LARGE_PROBE_SECONDS / 8)))


async def _round_trip(stub: wire_pb2_grpc.StageServiceStub, metadata: tuple[tuple[str, str], ...],
                      down: EmulatedLink[wire_pb2.ProbeRequest], up: EmulatedLink[wire_pb2.ProbeReply], size: int,
                      target: str) -> float:
    request = encode_probe(size)
    started = time.perf_counter()
    await down.put(request, request.ByteSize())
    request = await down.get()
    try:
        reply = await stub.Probe(request, metadata=metadata, timeout=PROBE_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        raise NodeUnavailableError(f"probing the link to {target} failed ({exc.code().name}: {exc.details()})") \
            from exc
    received = decode_probe(reply)
    if received != size:
        raise ClusterError(f"{target} says it received {received} bytes of a {size}-byte probe; is it a "
                           "splitexit node of this cluster?")
    await up.put(reply, max(1, reply.ByteSize()))
    await up.get()
    return time.perf_counter() - started


async def measure_link(cluster: ClusterSpec, sender: str, target: str, address: str) -> ProbeResult:
    """Probe the cluster's link from ``sender`` (this process) to node ``target`` at ``address``: its round
    trip and bandwidth, over a channel of its own with ``sender``'s credentials and the cluster's token."""
    link = cluster.link(sender, target)
    channel = open_channel(address, target, node_credentials(cluster, sender), cluster.message_limit)
    stub = wire_pb2_grpc.StageServiceStub(channel)
    metadata = token_metadata(cluster.security.token)
    down: EmulatedLink[wire_pb2.ProbeRequest] = EmulatedLink(link, seed=DOWN_SEED)
    up: EmulatedLink[wire_pb2.ProbeReply] = EmulatedLink(link, seed=UP_SEED)
    large = _large_probe(link, cluster.message_limit)
    try:
        await _round_trip(stub, metadata, down, up, SMALL_PROBE, target)  # warm the channel up
        small_times, large_times = [], []
        for _ in range(PROBES):
            small_times.append(await _round_trip(stub, metadata, down, up, SMALL_PROBE, target))
            large_times.append(await _round_trip(stub, metadata, down, up, large, target))
    finally:
        await down.close()
        await up.close()
        await channel.close(grace=None)
    rtt, extra = statistics.median(small_times), statistics.median(large_times) - statistics.median(small_times)
    fast = extra <= MIN_EXTRA_SHARE * rtt or extra <= MIN_EXTRA_SECONDS
    return ProbeResult(rtt, None if fast else 8.0 * (large - SMALL_PROBE) / extra)
