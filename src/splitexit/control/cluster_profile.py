"""Profile a running cluster through the runtime: each node times the model on itself, each link is probed.

``splitexit profile P --cluster C``, with the cluster's workers up (``splitexit up --cluster C``):

* **Nodes.** The whole model travels to each node as a stage file (``PutStage``, once; nodes cache it by
  sha256) and the node times every segment between the profile's candidate cuts and every exit head at
  the profile's batch sizes (``Profile``; see :mod:`splitexit.runtime.node_profile`). The reply is checked
  (one timing per segment and head, at exactly the asked batch sizes, finite and non-negative) and kept
  as :attr:`Profile.nodes[name] <splitexit.plan.profile.Profile.nodes>`, which the planner then uses for
  that node instead of this machine's timing. Bytes and codec times stay this machine's: they need the
  real activations, and the data set stays here.
* **Links.** Every link the planner prices (between the first nodes of neighbouring tiers, and the links
  the file declares past a tier) is probed from its sending side: from here for the edge's links, by the
  sending node for the others (see :mod:`splitexit.runtime.probe`). Stored as :attr:`Profile.links`.
* **Reuse.** A node's timing is kept until the model, the cuts, batch sizes or repeats, or the node's
  machine (host, CPU, cores, torch build, as its ``Health`` says) change; a link's figures until an end's
  address or the file's figures for that link change. ``--force`` measures everything again.

Measured links become planner figures in :func:`stored_link_estimates`: the bandwidth as measured, and a
one-way latency of half the round trip less what the planner already charges every message (gRPC and the
emulation's timers), so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import ClusterError, NodeUnavailableError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stage_file import sha256_hex, stage_file
from splitexit.plan.measure import DEFAULT_REPEATS
from splitexit.plan.profile import HeadTiming, MachineProfile, MeasuredLink, Profile, SegmentTiming, Timing
from splitexit.plan.topology import LinkEstimate, RuntimeCosts
from splitexit.runtime.control_client import NodeControl
from splitexit.runtime.control_messages import BatchTimes, NodeTiming, ProfileJob
from splitexit.runtime.probe import measure_link
from splitexit.runtime.security import node_credentials

__all__ = ["ClusterProfile", "links_to_measure", "node_machine", "profile_cluster", "stored_link_estimates"]

#: A node's reported seconds above this are not believed (an hour per segment call).
MAX_SECONDS = 3600.0
#: Idle factors a node may report: after at most this many idle seconds, ...
MAX_IDLE_GAP = 60.0
#: ... a call this many times slower than back to back, at least and at most.
MIN_IDLE_FACTOR, MAX_IDLE_FACTOR = 0.1, 1000.0
#: A measured round trip at or above this many seconds is not believed.
MAX_RTT = 600.0
#: Seconds a node's health call (before profiling it) may take.
HEALTH_TIMEOUT = 5.0
#: Characters of a peer's name quoted back in an error.
_QUOTE = 64


@dataclass(frozen=True)
class ClusterProfile:
    nodes: dict[str, MachineProfile]
    links: dict[tuple[str, str], MeasuredLink]
    measured: tuple[str, ...]  # nodes and links ("a → b") measured now; the rest were reused


def links_to_measure(cluster: ClusterSpec) -> list[tuple[str, str]]:
    """The links the planner prices: first node of each tier to the next tier's, and declared links past a tier."""
    heads = [members[0].name for _, members in sorted(cluster.tiers().items())]
    declared = {(link.source, link.target) for link in cluster.links}
    pairs = list(zip(heads, heads[1:]))
    pairs += [(heads[i], heads[j]) for i in range(len(heads)) for j in range(i + 2, len(heads))
              if (heads[i], heads[j]) in declared]
    return pairs


def _link_key(cluster: ClusterSpec, source: str, target: str) -> dict[str, object]:
    spec = cluster.link(source, target)
    figures = spec.model_dump(mode="json", exclude={"source", "target", "codec"})
    return {"from_address": cluster.node(source).address, "to_address": cluster.node(target).address,
            "link": figures}


def _node_key(local: MachineProfile, machine: str, address: str | None) -> dict[str, object]:
    """A node timing's key: the local key's model, cuts, batch sizes and repeats; the node's machine."""
    kept = {k: v for k, v in local.key.items() if k not in ("machine", "torch", "codecs")}
    return {**kept, "machine": machine, "address": address}


def _seconds(timing: Timing, what: str) -> Timing:
    values = (timing.median, timing.q1, timing.q3)
    if not all(math.isfinite(v) and 0 <= v <= MAX_SECONDS for v in values):
        raise ValueError(f"{what}: seconds {values} are not finite, non-negative and below {MAX_SECONDS:g}")
    return Timing(*values)


def _per_batch(batches: BatchTimes, sizes: tuple[int, ...], what: str) -> dict[int, Timing]:
    got = tuple(batch for batch, _ in batches)
    if got != sizes:
        raise ValueError(f"{what}: timed at batch sizes {list(got)[:8]}, asked for {list(sizes)}")
    return {batch: _seconds(seconds, f"{what} at batch {batch}") for batch, seconds in batches}


def node_machine(timing: NodeTiming | None, local: MachineProfile, *, node: str,
                 key: Mapping[str, object]) -> MachineProfile:
    """``node``'s timing from its reply, checked against what was asked; bytes and codecs from ``local``."""
    sizes = tuple(local.batch_sizes)
    try:
        if timing is None:
            raise ValueError("no timing in the reply")
        if len(timing.segments) != len(local.segments) or len(timing.heads) != len(local.heads):
            raise ValueError(f"{len(timing.segments)} segments and {len(timing.heads)} heads timed, asked for "
                             f"{len(local.segments)} and {len(local.heads)}")
        idle = {}
        for gap_s, factor in timing.idle_factors:
            if not (math.isfinite(gap_s) and 0 < gap_s <= MAX_IDLE_GAP and math.isfinite(factor)
                    and MIN_IDLE_FACTOR <= factor <= MAX_IDLE_FACTOR):
                raise ValueError(f"idle factor {factor} after {gap_s} s is out of range")
            idle[gap_s] = factor
        segments = tuple(SegmentTiming(s.start, s.end, s.flops, _per_batch(r, sizes, f"segment {i}"))
                         for i, (s, r) in enumerate(zip(local.segments, timing.segments)))
        heads = tuple(HeadTiming(h.exit, h.cut, _per_batch(r, sizes, f"exit {h.exit}"))
                      for h, r in zip(local.heads, timing.heads))
        return MachineProfile(key=dict(key), measured_on=node, batch_sizes=sizes,
                              call_overhead=_seconds(timing.call_overhead, "call overhead"),
                              stage_call=_per_batch(timing.stage_call, sizes, "stage call"), idle_factors=idle,
                              segments=segments, heads=heads, transfers=local.transfers)
    except ValueError as exc:
        raise ClusterError(f"node {node} sent an unusable profile ({exc}); is it running this splitexit "
                           "version?") from None


def _link_figures(source: str, target: str, rtt: float, bandwidth: float | None, key: Mapping[str, object]
                  ) -> MeasuredLink:
    if not (math.isfinite(rtt) and 0 < rtt < MAX_RTT) or (bandwidth is not None and not
                                                        (math.isfinite(bandwidth) and bandwidth > 0)):
        raise ClusterError(f"the link {source} → {target} measured an impossible round trip {rtt!r} s or "
                           f"bandwidth {bandwidth!r} bit/s")
    return MeasuredLink(source, target, rtt, bandwidth, dict(key))


class _Profiler:
    """One ``profile --cluster`` run: control channels to every node, what to measure, what was measured."""

    def __init__(self, net: EarlyExitNet, profile: Profile, cluster: ClusterSpec, *, force: bool):
        self.net, self.profile, self.cluster, self.force = net, profile, cluster, force
        self.edge = cluster.edge.name
        self.credentials = node_credentials(cluster, self.edge)
        self.nodes = dict(profile.nodes)
        self.links = dict(profile.links)
        self.measured: list[str] = []
        self._stage: tuple[str, bytes] | None = None

    async def stage(self) -> tuple[str, bytes]:
        """The whole model's stage file and its sha256, built once (in an executor: torch work)."""
        if self._stage is None:
            def build() -> tuple[str, bytes]:
                data = stage_file(self.net, MODEL_INPUT, MODEL_OUTPUT)
                return sha256_hex(data), data

            self._stage = await asyncio.get_running_loop().run_in_executor(None, build)
        return self._stage

    def repeats(self) -> int:
        """How often the local profile timed each call: nodes time theirs as often."""
        repeats = self.profile.timing.key.get("repeats", DEFAULT_REPEATS)
        if not isinstance(repeats, int):
            raise ClusterError(f"the profile's timing key has repeats {repeats!r}, not a count; run "
                               "`splitexit profile` again")
        return repeats

    def stale_links(self, source: str) -> list[tuple[str, str]]:
        return [(a, b) for a, b in links_to_measure(self.cluster) if a == source and
                (self.force or (a, b) not in self.links or self.links[(a, b)].key != _link_key(self.cluster, a, b))]

    def keep_link(self, source: str, target: str, rtt: float, bandwidth: float | None) -> None:
        self.links[(source, target)] = _link_figures(source, target, rtt, bandwidth,
                                                     _link_key(self.cluster, source, target))
        self.measured.append(f"{source} → {target}")

    async def edge_links(self) -> None:
        for source, target in self.stale_links(self.edge):
            try:
                figures = await measure_link(self.cluster, source, target, _address(self.cluster.node(target)))
            except NodeUnavailableError as exc:
                raise ClusterError(f"{exc}; are the workers up (`splitexit up --cluster ...`)?") from None
            self.keep_link(source, target, figures.rtt, figures.bandwidth)

    async def node(self, node: NodeSpec) -> None:
        control = NodeControl(node, credentials=self.credentials, token=self.cluster.security.token,
                              message_limit=self.cluster.message_limit)
        try:
            try:
                health = await control.health(HEALTH_TIMEOUT)
            except NodeUnavailableError as exc:
                raise ClusterError(f"{exc}; start the workers first (`splitexit up --cluster ...`)") from None
            key = _node_key(self.profile.timing, health.machine, node.address)
            stored = self.nodes.get(node.name)
            time_it = self.force or stored is None or dict(stored.key) != key
            links = self.stale_links(node.name)
            if not time_it and not links:
                return
            job = ProfileJob(links=tuple(NodeSpec(name=b, address=_address(self.cluster.node(b))) for _, b in links))
            if time_it:
                sha256, data = await self.stage()
                job = replace(job, stage_sha256=sha256, cuts=tuple(self.profile.cuts),
                              batch_sizes=tuple(self.profile.timing.batch_sizes), repeats=self.repeats())
                if sha256 not in health.stages:
                    await control.put_stage(sha256, data)
            reply = await control.profile(job)
            if reply.missing_stage:  # evicted between the upload and the request
                await control.put_stage(*await self.stage())
                reply = await control.profile(job)
            if time_it:
                self.nodes[node.name] = node_machine(reply.timing, self.profile.timing, node=node.name, key=key)
                self.measured.append(node.name)
            asked = {b for _, b in links}
            for figure in reply.links:
                if figure.target not in asked:
                    raise ClusterError(f"node {node.name} measured a link to {figure.target[:_QUOTE]!r}, which "
                                       "was not asked for")
                asked.discard(figure.target)
                self.keep_link(node.name, figure.target, figure.rtt, figure.bandwidth)
            if asked:
                raise ClusterError(f"node {node.name} did not measure its links to {sorted(asked)}")
        finally:
            await control.close()


def _address(node: NodeSpec) -> str:
    if not node.address:
        raise ClusterError(f"node {node.name} has no address in the cluster file; profiling a cluster needs "
                           "every node's address")
    return node.address


async def profile_cluster(net: EarlyExitNet, profile: Profile, cluster: ClusterSpec, *,
                          force: bool = False) -> ClusterProfile:
    """Time the model on every worker of ``cluster`` and probe the planner's links (see the module docstring).

    Nodes are profiled one after another, so that their timings do not disturb each other's on shared
    hardware.
    """
    profiler = _Profiler(net, profile, cluster, force=force)
    await profiler.edge_links()
    for node in cluster.nodes:
        if node.role != "edge":
            await profiler.node(node)
    return ClusterProfile(profiler.nodes, profiler.links, tuple(profiler.measured))


def stored_link_estimates(profile: Profile, cluster: ClusterSpec, costs: RuntimeCosts = RuntimeCosts()
                          ) -> dict[tuple[str, str], LinkEstimate]:
    """The profile's measured links that still match the cluster file, as planner figures."""
    estimates = {}
    for (source, target), link in profile.links.items():
        try:
            if dict(link.key) != _link_key(cluster, source, target):
                continue
        except KeyError:  # a node that left the file
            continue
        declared = LinkEstimate.from_spec(cluster.link(source, target))
        one_way = link.rtt / 2 - costs.per_message(declared) - declared.jitter / 2
        estimates[(source, target)] = replace(declared, bandwidth=link.bandwidth, latency=max(0.0, one_way),
                                              origin="measured")
    return estimates
