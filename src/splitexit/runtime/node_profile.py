"""A node's side of ``splitexit profile --cluster``: time the model on this node, measure this node's links.

The entry ships the whole model as a stage file and asks for the segments between its candidate cuts and
every exit head to be timed here, with the same code that times the entry's own machine
(:func:`~splitexit.plan.profile.measure_timing`), on synthetic inputs: compute time does not depend on the
values, and the data set stays with the entry. Codecs are not timed here; their bytes need real
activations. A node times its own hardware: the cluster file's emulated ``slowdown`` is applied by the
planner, for every node alike.

Everything in the request is checked first (a whole-model stage, cuts of that model, bounded batch sizes
and repeats, peers of this cluster), so a bad request gets a clear error and the node serves on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.errors import WireError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.trace_guard import TRACE_GUARD
from splitexit.plan.profile import MachineProfile, Timing, machine_name, measure_timing
from splitexit.runtime.probe import measure_link
from splitexit.wire import wire_pb2

__all__ = ["check_profile_request", "machine_identity", "measure_peer_links", "time_model", "timing_reply"]

#: Bounds on what a profile request may ask of a node.
MAX_PROFILE_BATCH = 256
MAX_REPEATS = 200


def machine_identity() -> str:
    """What a node's timing depends on besides the model: this machine and its torch build."""
    return f"{machine_name()} / torch {torch.__version__}"


def check_profile_request(request: wire_pb2.ProfileRequest, net: EarlyExitNet) -> tuple[list[int], list[int], int]:
    """The request's cuts, batch sizes and repeats, once they are known to make sense for ``net``."""
    cuts = [int(c) for c in request.cuts]
    known = {c.id for c in net.graph.cut_points}
    if cuts != sorted(set(cuts)) or not set(cuts) <= known:
        raise WireError(f"profile cuts must be distinct cut ids of this model in forward order (0..{len(known) - 1})",
                        code="bad_message")
    missing = [c.id for c in net.exit_cuts if c.id not in cuts]
    if missing:
        raise WireError(f"profile cuts must include the exit cuts {missing}", code="bad_message")
    sizes = sorted(set(int(b) for b in request.batch_sizes))
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_PROFILE_BATCH:
        raise WireError(f"profile batch sizes must be 1..{MAX_PROFILE_BATCH}, got {list(request.batch_sizes)[:8]}",
                        code="bad_message")
    if not 1 <= request.repeats <= MAX_REPEATS:
        raise WireError(f"profile repeats must be 1..{MAX_REPEATS}, got {request.repeats}", code="bad_message")
    return cuts, sizes, int(request.repeats)


def _synthetic_inputs(net: EarlyExitNet, rows: int) -> torch.Tensor:
    shape = (rows, *net.input_shape)
    if net.input_dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(net.input_dtype)
    return torch.zeros(shape, dtype=net.input_dtype)


def time_model(net: EarlyExitNet, cuts: Sequence[int], sizes: Sequence[int], repeats: int) -> MachineProfile:
    """Time every segment and head of ``net`` here (blocking: run it in a worker thread)."""
    with TRACE_GUARD.shared():  # not while this process traces a model (trace_guard.py)
        return measure_timing(net, _synthetic_inputs(net, max(sizes)), cuts, batch_sizes=sizes, codecs=(),
                              repeats=repeats)


def _stats(timing: Timing) -> wire_pb2.TimingStats:
    return wire_pb2.TimingStats(median=timing.median, q1=timing.q1, q3=timing.q3)


def _batches(seconds: dict[int, Timing]) -> list[wire_pb2.BatchTiming]:
    return [wire_pb2.BatchTiming(batch=b, seconds=_stats(t)) for b, t in sorted(seconds.items())]


def timing_reply(machine: MachineProfile) -> wire_pb2.ProfileReply:
    """The compute part of a profile, as the wire carries it."""
    return wire_pb2.ProfileReply(
        machine=machine_identity(), call_overhead=_stats(machine.call_overhead),
        stage_call=_batches(dict(machine.stage_call)),
        idle_factors=[wire_pb2.IdleFactor(gap_s=g, factor=f) for g, f in sorted(machine.idle_factors.items())],
        segments=[wire_pb2.PartTiming(batches=_batches(dict(s.seconds))) for s in machine.segments],
        heads=[wire_pb2.PartTiming(batches=_batches(dict(h.seconds))) for h in machine.heads])


async def measure_peer_links(cluster: ClusterSpec, sender: str, peers: Sequence[NodeSpec]
                             ) -> list[wire_pb2.LinkFigure]:
    """Probe this node's link to each of ``peers`` (nodes of the cluster file), one after another."""
    figures = []
    for peer in peers:
        try:
            cluster.node(peer.name)
        except KeyError:
            raise WireError(f"cannot measure a link to {peer.name[:64]!r}: not a node of this cluster",
                            code="bad_message") from None
        measured = await measure_link(cluster, sender, peer.name, peer.address or "")
        figures.append(wire_pb2.LinkFigure(target=peer.name, rtt_s=measured.rtt,
                                           bandwidth_bps=measured.bandwidth or 0.0))
    return figures
