"""A node's side of ``splitexit profile --cluster``: time the model on this node, measure this node's links.

The entry ships the whole model as a stage file and asks for the segments between its candidate cuts and
every exit head to be timed here, with the same code that times the entry's own machine
(:func:`~splitexit.plan.measure.measure_timing`), on synthetic inputs: compute time does not depend on the
values, and the data set stays with the entry. Codecs are not timed here; their bytes need real
activations. A node times its own hardware: the cluster file's emulated ``slowdown`` is applied by the
planner, for every node alike.

Everything in the request is checked first (a whole-model stage, cuts of that model, bounded batch sizes
and repeats, peers of this cluster), so a bad request gets a clear error and the node serves on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.errors import WireError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.trace_guard import TRACE_GUARD
from splitexit.plan.measure import measure_timing
from splitexit.plan.profile import MachineProfile, Timing
from splitexit.plan.profile_keys import machine_name
from splitexit.runtime.control_messages import BatchTimes, NodeTiming, PeerLink, ProfileJob
from splitexit.runtime.devices import CPU, ComputeDevice, to_device
from splitexit.runtime.probe import measure_link

__all__ = ["check_profile_job", "machine_identity", "measure_peer_links", "node_timing", "time_model"]

#: Bounds on what a profile request may ask of a node.
MAX_PROFILE_BATCH = 256
MAX_REPEATS = 200
#: Characters of a peer's name quoted back in an error.
_QUOTE = 64
#: Seed of the synthetic inputs a node times the model on (fixed: runs are repeatable).
INPUT_SEED = 0


def machine_identity() -> str:
    """What a node's timing depends on besides the model: this machine and its torch build."""
    return f"{machine_name()} / torch {torch.__version__}"


def check_profile_job(job: ProfileJob, net: EarlyExitNet) -> tuple[list[int], list[int], int]:
    """The job's cuts, batch sizes and repeats, once they are known to make sense for ``net``."""
    cuts = list(job.cuts)
    known = {c.id for c in net.graph.cut_points}
    if cuts != sorted(set(cuts)) or not set(cuts) <= known:
        raise WireError(f"profile cuts must be distinct cut ids of this model in forward order (0..{len(known) - 1})",
                        code="bad_message")
    missing = [c.id for c in net.exit_cuts if c.id not in cuts]
    if missing:
        raise WireError(f"profile cuts must include the exit cuts {missing}", code="bad_message")
    sizes = sorted(set(job.batch_sizes))
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_PROFILE_BATCH:
        raise WireError(f"profile batch sizes must be 1..{MAX_PROFILE_BATCH}, got {list(job.batch_sizes)[:8]}",
                        code="bad_message")
    if not 1 <= job.repeats <= MAX_REPEATS:
        raise WireError(f"profile repeats must be 1..{MAX_REPEATS}, got {job.repeats}", code="bad_message")
    return cuts, sizes, job.repeats


def _synthetic_inputs(net: EarlyExitNet, rows: int) -> torch.Tensor:
    shape = (rows, *net.input_shape)
    if net.input_dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(INPUT_SEED)).to(net.input_dtype)
    return torch.zeros(shape, dtype=net.input_dtype)


def time_model(net: EarlyExitNet, cuts: Sequence[int], sizes: Sequence[int], repeats: int,
               compute: ComputeDevice = CPU) -> MachineProfile:
    """Time every segment and head of ``net`` here, on the node's device and in its dtype (``net`` is there
    already); blocking: run it in a worker thread."""
    (inputs,) = to_device((_synthetic_inputs(net, max(sizes)),), compute)
    with TRACE_GUARD.shared():  # not while this process traces a model (trace_guard.py)
        return measure_timing(net, inputs, cuts, batch_sizes=sizes, codecs=(), repeats=repeats, device=compute)


def _batches(seconds: dict[int, Timing]) -> BatchTimes:
    return tuple(sorted(seconds.items()))


def node_timing(machine: MachineProfile) -> NodeTiming:
    """The compute part of a profile, as a node reports it."""
    return NodeTiming(call_overhead=machine.call_overhead, stage_call=_batches(dict(machine.stage_call)),
                      idle_factors=tuple(sorted(machine.idle_factors.items())),
                      segments=tuple(_batches(dict(s.seconds)) for s in machine.segments),
                      heads=tuple(_batches(dict(h.seconds)) for h in machine.heads))


async def measure_peer_links(cluster: ClusterSpec, sender: str, peers: Sequence[NodeSpec]) -> tuple[PeerLink, ...]:
    """Probe this node's link to each of ``peers`` (nodes of the cluster file), one after another."""
    figures = []
    for peer in peers:
        try:
            cluster.node(peer.name)
        except KeyError:
            raise WireError(f"cannot measure a link to {peer.name[:_QUOTE]!r}: not a node of this cluster",
                            code="bad_message") from None
        measured = await measure_link(cluster, sender, peer.name, peer.address or "")
        figures.append(PeerLink(peer.name, measured.rtt, measured.bandwidth))
    return tuple(figures)
