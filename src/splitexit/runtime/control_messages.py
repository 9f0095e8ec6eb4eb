"""The node's control calls in our own types, and the one place each is turned into protobuf and back.

The coordinator, the health prober and ``profile --cluster`` speak :class:`Assignment`,
:class:`NodeHealth`, :class:`ProfileJob` and :class:`NodeProfile`; the node answers in the same types.
Only the transport (the control client, the node's servicer, the probe) calls the ``encode_*`` and
``decode_*`` pairs below. Decoding a request checks what the node would otherwise trust (peers are valid
node specs, codec names exist) and raises :class:`~splitexit.errors.WireError` or
:class:`~splitexit.errors.ConfigError`; decoding a reply keeps the numbers as sent, for the caller to judge.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import ValidationError

from splitexit.config import NodeSpec, describe_validation_error
from splitexit.config.codec_names import CodecSpec, parse_codec
from splitexit.errors import WireError
from splitexit.plan.profile import Timing
from splitexit.wire import wire_pb2

__all__ = [
    "Assignment",
    "BatchTimes",
    "LinkHealth",
    "NodeHealth",
    "NodeProfile",
    "NodeTiming",
    "PeerLink",
    "ProfileJob",
    "decode_assign_reply",
    "decode_assignment",
    "decode_health",
    "decode_node_profile",
    "decode_probe",
    "decode_profile_job",
    "decode_stage_chunk",
    "encode_assign_reply",
    "encode_assignment",
    "encode_health",
    "encode_node_profile",
    "encode_probe",
    "encode_probe_reply",
    "encode_profile_job",
    "encode_stage_chunks",
]

#: Characters of a node's device name kept from its Health reply.
MAX_DEVICE_NAME = 64

#: Characters of a peer's name or address quoted back in an error (the rest is the peer's to know).
_QUOTE = 64


# ------------------------------------------------------------------------------------------ types
@dataclass(frozen=True)
class Assignment:
    """What a node serves under one plan version: its stage file, where its rows go on, who may send to it."""

    plan_version: int
    stage_sha256: str
    edge: str  # whose plan this is: a node keeps the recent plans of every edge
    downstream: tuple[NodeSpec, ...] = ()  # replicas of the next stage; empty for the last stage
    upstream: tuple[str, ...] = ()  # nodes allowed to open streams to this stage
    codec: CodecSpec | None = None  # of the link to the downstream replicas; None for the last stage


@dataclass(frozen=True)
class LinkHealth:
    """One link as the node that sends on it reports it (bandwidth 0: too little traffic lately to tell)."""

    source: str
    target: str
    raw_bytes: int
    wire_bytes: int
    messages: int
    rows: int
    bandwidth_bps: float


@dataclass(frozen=True)
class NodeHealth:
    """A node's answer to a health call: whether it serves, what, how busy, and every link from it on."""

    node: str
    ready: bool
    plan_version: int  # the newest plan this node serves (0: none yet)
    tier: int
    queued: int  # batches waiting for compute
    in_flight: int  # requests accepted and not yet answered
    stages: tuple[str, ...]  # sha256 of every stage file cached
    incarnation: str  # random per process start
    machine: str  # host, CPU, cores and torch build: a stored profile of another machine is stale
    links: tuple[LinkHealth, ...] = ()
    data_port: int = 0  # where the node's data plane listens (0: not listening)
    device: str = ""  # where its stage computes, and in what dtype: cpu, cuda:0/bf16, ...


@dataclass(frozen=True)
class ProfileJob:
    """Time the whole-model stage file ``stage_sha256`` on a node (empty: do not), then measure its links."""

    stage_sha256: str = ""
    cuts: tuple[int, ...] = ()  # candidate cuts in forward order: every segment between them is timed
    batch_sizes: tuple[int, ...] = ()
    repeats: int = 0
    links: tuple[NodeSpec, ...] = ()  # nodes this node sends to


#: (batch size, seconds of one call at that size), in the order the node sent them.
BatchTimes = tuple[tuple[int, Timing], ...]


@dataclass(frozen=True)
class NodeTiming:
    """A node's compute timing, one entry per segment and exit head, as it sent it."""

    call_overhead: Timing
    stage_call: BatchTimes
    idle_factors: tuple[tuple[float, float], ...]  # (idle seconds before a call, how much slower it runs)
    segments: tuple[BatchTimes, ...]
    heads: tuple[BatchTimes, ...]


@dataclass(frozen=True)
class PeerLink:
    """A link a node measured: to ``target``, round trip ``rtt`` seconds, ``bandwidth`` bit/s (None: too
    fast to tell)."""

    target: str
    rtt: float
    bandwidth: float | None


@dataclass(frozen=True)
class NodeProfile:
    """A node's answer to a :class:`ProfileJob`; ``missing_stage``: upload the stage file, then ask again."""

    machine: str
    timing: NodeTiming | None = None
    links: tuple[PeerLink, ...] = ()
    missing_stage: bool = False


# ------------------------------------------------------------------------------------------ peers
def _encode_peer(node: NodeSpec) -> wire_pb2.Peer:
    return wire_pb2.Peer(name=node.name, address=node.address or "")


def _decode_peer(peer: wire_pb2.Peer) -> NodeSpec:
    try:
        return NodeSpec(name=peer.name, address=peer.address)
    except ValidationError as exc:
        raise WireError(f"downstream peer {peer.name[:_QUOTE]!r} at {peer.address[:_QUOTE]!r} is not a valid "
                        f"node: {describe_validation_error(exc)}", code="bad_message") from exc


# ------------------------------------------------------------------------------------------ Assign
def encode_assignment(assignment: Assignment) -> wire_pb2.AssignRequest:
    codec = assignment.codec
    return wire_pb2.AssignRequest(plan_version=assignment.plan_version, stage_sha256=assignment.stage_sha256,
                                  edge=assignment.edge, downstream=[_encode_peer(p) for p in assignment.downstream],
                                  upstream=list(assignment.upstream), codec=codec.name if codec else "")


def decode_assignment(request: wire_pb2.AssignRequest) -> Assignment:
    """The assignment, with every peer and the codec name checked (WireError, ConfigError)."""
    return Assignment(plan_version=request.plan_version, stage_sha256=request.stage_sha256, edge=request.edge,
                      downstream=tuple(_decode_peer(p) for p in request.downstream),
                      upstream=tuple(request.upstream),
                      codec=parse_codec(request.codec) if request.codec else None)


def encode_assign_reply(served: bool) -> wire_pb2.AssignReply:
    return wire_pb2.AssignReply(missing_stage=not served)


def decode_assign_reply(reply: wire_pb2.AssignReply) -> bool:
    """True if the node serves the stage; False if it lacks the file (upload it, then assign again)."""
    return not reply.missing_stage


# ------------------------------------------------------------------------------------------ PutStage
def encode_stage_chunks(sha256: str, data: bytes, piece: int) -> Iterator[wire_pb2.StageChunk]:
    """A stage file as the stream of chunks of at most ``piece`` bytes that ``PutStage`` takes."""
    for offset in range(0, len(data), piece):
        yield wire_pb2.StageChunk(sha256=sha256, total_size=len(data), data=data[offset:offset + piece])


def decode_stage_chunk(chunk: wire_pb2.StageChunk) -> tuple[str, int, bytes]:
    """(sha256, total size, data) of one chunk; the stage cache checks them against each other."""
    return chunk.sha256, chunk.total_size, chunk.data


# ------------------------------------------------------------------------------------------ Health
def encode_health(health: NodeHealth) -> wire_pb2.HealthReply:
    return wire_pb2.HealthReply(
        node=health.node, ready=health.ready, plan_version=health.plan_version, tier=health.tier,
        queued=health.queued, in_flight=health.in_flight, stages=list(health.stages),
        incarnation=health.incarnation, machine=health.machine, data_port=health.data_port, device=health.device,
        links=[wire_pb2.LinkBytes(source=link.source, target=link.target, raw_bytes=link.raw_bytes,
                                  wire_bytes=link.wire_bytes, messages=link.messages, rows=link.rows,
                                  bandwidth_bps=link.bandwidth_bps) for link in health.links])


def decode_health(reply: wire_pb2.HealthReply) -> NodeHealth:
    return NodeHealth(
        node=reply.node, ready=reply.ready, plan_version=reply.plan_version, tier=reply.tier, queued=reply.queued,
        in_flight=reply.in_flight, stages=tuple(reply.stages), incarnation=reply.incarnation,
        machine=reply.machine, data_port=reply.data_port, device=reply.device[:MAX_DEVICE_NAME],
        links=tuple(LinkHealth(source=link.source, target=link.target, raw_bytes=link.raw_bytes,
                               wire_bytes=link.wire_bytes, messages=link.messages, rows=link.rows,
                               bandwidth_bps=link.bandwidth_bps) for link in reply.links))


# ------------------------------------------------------------------------------------------ Profile
def encode_profile_job(job: ProfileJob) -> wire_pb2.ProfileRequest:
    return wire_pb2.ProfileRequest(stage_sha256=job.stage_sha256, cuts=list(job.cuts),
                                   batch_sizes=list(job.batch_sizes), repeats=job.repeats,
                                   links=[_encode_peer(p) for p in job.links])


def decode_profile_job(request: wire_pb2.ProfileRequest) -> ProfileJob:
    """The job as sent; the node checks its cuts, sizes and repeats against the model it times."""
    return ProfileJob(stage_sha256=request.stage_sha256, cuts=tuple(int(c) for c in request.cuts),
                      batch_sizes=tuple(int(b) for b in request.batch_sizes), repeats=int(request.repeats),
                      links=tuple(_decode_peer(p) for p in request.links))


def _encode_stats(timing: Timing) -> wire_pb2.TimingStats:
    return wire_pb2.TimingStats(median=timing.median, q1=timing.q1, q3=timing.q3)


def _encode_batches(times: BatchTimes) -> list[wire_pb2.BatchTiming]:
    return [wire_pb2.BatchTiming(batch=b, seconds=_encode_stats(t)) for b, t in times]


def _decode_stats(stats: wire_pb2.TimingStats) -> Timing:
    return Timing(stats.median, stats.q1, stats.q3)


def _decode_batches(batches: list[wire_pb2.BatchTiming]) -> BatchTimes:
    return tuple((int(b.batch), _decode_stats(b.seconds)) for b in batches)


def encode_node_profile(profile: NodeProfile) -> wire_pb2.ProfileReply:
    reply = wire_pb2.ProfileReply(missing_stage=profile.missing_stage, machine=profile.machine, links=[
        wire_pb2.LinkFigure(target=link.target, rtt_s=link.rtt, bandwidth_bps=link.bandwidth or 0.0)
        for link in profile.links])
    timing = profile.timing
    if timing is not None:
        reply.call_overhead.CopyFrom(_encode_stats(timing.call_overhead))
        reply.stage_call.extend(_encode_batches(timing.stage_call))
        reply.idle_factors.extend(wire_pb2.IdleFactor(gap_s=g, factor=f) for g, f in timing.idle_factors)
        reply.segments.extend(wire_pb2.PartTiming(batches=_encode_batches(s)) for s in timing.segments)
        reply.heads.extend(wire_pb2.PartTiming(batches=_encode_batches(h)) for h in timing.heads)
    return reply


def decode_node_profile(reply: wire_pb2.ProfileReply) -> NodeProfile:
    """The reply as sent (``timing`` None when it carries none); ``profile --cluster`` judges the numbers."""
    timing = None
    if reply.HasField("call_overhead") or reply.stage_call or reply.idle_factors or reply.segments or reply.heads:
        timing = NodeTiming(call_overhead=_decode_stats(reply.call_overhead),
                            stage_call=_decode_batches(list(reply.stage_call)),
                            idle_factors=tuple((f.gap_s, f.factor) for f in reply.idle_factors),
                            segments=tuple(_decode_batches(list(s.batches)) for s in reply.segments),
                            heads=tuple(_decode_batches(list(h.batches)) for h in reply.heads))
    links = tuple(PeerLink(link.target, link.rtt_s, link.bandwidth_bps or None) for link in reply.links)
    return NodeProfile(machine=reply.machine, timing=timing, links=links, missing_stage=reply.missing_stage)


# ------------------------------------------------------------------------------------------ Probe
def encode_probe(size: int) -> wire_pb2.ProbeRequest:
    """A probe of ``size`` payload bytes."""
    return wire_pb2.ProbeRequest(payload=bytes(size))


def encode_probe_reply(request: wire_pb2.ProbeRequest) -> wire_pb2.ProbeReply:
    """The node's answer to a probe: how many payload bytes arrived."""
    return wire_pb2.ProbeReply(size=len(request.payload))


def decode_probe(reply: wire_pb2.ProbeReply) -> int:
    """Payload bytes the node says it received."""
    return int(reply.size)
