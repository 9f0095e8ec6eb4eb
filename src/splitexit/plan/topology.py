"""The chain the planner places a model on: tiers, the links between them, and what the runtime adds.

The chain is a list of tiers: the edge (tier 0), then the workers in the cluster file's order (replicas of
one tier share its stage). A plan may leave a tier without a stage (*skip* it); rows then travel from the
tier before it to the tier after it over the link the cluster file declares between the two, or else over
the links in between, composed in series, as the runtime sends them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from splitexit.config import ClusterSpec, LinkSpec, NodeSpec
from splitexit.config.codec_names import AUTO
from splitexit.errors import ConfigError
from splitexit.links import in_series, retransmission_timeout

__all__ = [
    "LinkEstimate",
    "RuntimeCosts",
    "Tier",
    "Topology",
    "pinned_codecs",
    "tier_groups",
    "topology_from_cluster",
    "visited_tiers",
]


@dataclass(frozen=True)
class LinkEstimate:
    """One direction's figures for a hop (the runtime emulates both directions alike).

    ``bandwidth`` is bits per second (None: not limited), ``latency`` and ``jitter`` seconds, ``loss`` the
    fraction of messages that need a retransmission. ``origin`` says where the figures come from.
    ``codecs``: the only codecs this link may use (the cluster file names one for it); None: any the plan may.
    """

    bandwidth: float | None = None
    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    origin: str = "cluster file"
    emulated: bool = False  # delayed by the runtime's emulation (its sleeps wake late: RuntimeCosts.emulation_overhead)
    codecs: tuple[str, ...] | None = None

    @classmethod
    def from_spec(cls, spec: LinkSpec) -> LinkEstimate:
        return cls(spec.bandwidth, spec.latency, spec.jitter, spec.loss, origin="cluster file", emulated=spec.emulated)

    @classmethod
    def compose(cls, links: Sequence[LinkEstimate]) -> LinkEstimate:
        """Links in series (a skipped tier): the narrowest bandwidth, latencies and jitters add, losses combine."""
        if len(links) == 1:
            return links[0]
        return cls(*in_series(links), origin=" + ".join(sorted({link.origin for link in links})),
                   emulated=any(link.emulated for link in links))  # a path the file does not describe: any codec

    def delay(self) -> float:
        """Expected seconds from the end of serialisation to delivery."""
        extra = self.loss * retransmission_timeout(self.latency, self.jitter) if self.loss > 0 else 0.0
        return self.latency + self.jitter / 2 + extra

    def serialisation(self, nbytes: float) -> float:
        return 0.0 if self.bandwidth is None else nbytes * 8.0 / self.bandwidth


@dataclass(frozen=True)
class Tier:
    """One position of the chain: its nodes (replicas) and how much slower than the profiling machine they are."""

    index: int
    nodes: tuple[str, ...]
    compute_scale: float = 1.0  # the node's slowdown: the emulation stretches stage compute by it
    codec_scale: float = 1.0  # the emulation does not slow encoding and decoding; a real slow device would

    @property
    def name(self) -> str:
        return "|".join(self.nodes)


@dataclass(frozen=True)
class RuntimeCosts:
    """What the runtime adds beyond measured compute and codecs.

    The overheads were fitted against `splitexit run --window 1` (see docs/planning.md); message sizes
    follow today's wire format (a trace stamp per event, results carry the logits).
    """

    max_batch: int = 8
    stage_overhead: float = 0.0006  # handing a batch to the stage's worker thread and back, per stage visited
    compute_overhead: float = 0.00015  # the runtime's own work inside a stage's timed compute (slowed with it)
    message_overhead: float = 0.00075  # building, writing, reading and decoding one gRPC message, per link direction
    emulation_overhead: float = 0.0008  # per message on an emulated link: its asyncio sleeps wake late
    header_bytes: int = 24  # a batch message around its tensors (plan version, request id, framing)
    stamp_bytes: int = 28  # one (node, event, time) trace stamp
    stamps_first_hop: int = 5  # the edge's batch: queued, compute start and end, encoded, sent
    stamps_per_hop: int = 7  # each further node adds received and decoded, then the same five
    result_bytes: int = 24  # a result message without logits and trace

    def per_message(self, link: LinkEstimate) -> float:
        """Software seconds one message costs on ``link``, besides codecs, serialisation and propagation."""
        return self.message_overhead + (self.emulation_overhead if link.emulated else 0.0)

    def down_bytes(self, hop: int) -> float:
        """Message bytes beyond the tensors on the ``hop``-th link of a request's path (0: from the edge)."""
        return self.header_bytes + self.stamp_bytes * (self.stamps_first_hop + self.stamps_per_hop * hop)

    def up_bytes(self, hop: int, classes: int) -> float:
        """A result crossing the ``hop``-th link back up, answered at the node right after it."""
        stamps = self.stamps_first_hop + self.stamps_per_hop * hop + self.stamps_per_hop - 1
        return self.result_bytes + 4 * classes + self.stamp_bytes * stamps


@dataclass(frozen=True)
class Topology:
    """The chain the planner places a model on: tiers, the links between them, runtime costs.

    ``links[i]`` joins tier i and tier i + 1. A plan that skips tiers sends over ``direct[(i, j)]`` when
    there is one (the cluster file declares that link, or the runtime measured it), as the runtime does,
    and otherwise over the hops in between, composed in series.
    """

    tiers: tuple[Tier, ...]
    links: tuple[LinkEstimate, ...]
    costs: RuntimeCosts = RuntimeCosts()
    direct: Mapping[tuple[int, int], LinkEstimate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError("a topology needs at least the edge")
        if len(self.links) != len(self.tiers) - 1:
            raise ConfigError(f"{len(self.tiers)} tiers need {len(self.tiers) - 1} links, got {len(self.links)}")
        if any(not 0 <= i < j - 1 < len(self.tiers) - 1 for i, j in self.direct):
            raise ConfigError(f"direct links must skip a tier of the {len(self.tiers)}: got {sorted(self.direct)}")

    def link(self, source: int, target: int) -> LinkEstimate:
        """The link from tier ``source`` to tier ``target`` (later)."""
        direct = self.direct.get((source, target))
        return direct if direct is not None else LinkEstimate.compose(self.links[source:target])

    def with_bandwidth(self, bandwidth: float | None, tier: int = 0) -> Topology:
        """The same chain with the bandwidth of every link leaving ``tier`` replaced (the edge's uplinks by
        default): for bandwidth sweeps."""
        links = list(self.links)
        links[tier] = replace(links[tier], bandwidth=bandwidth)
        direct = {pair: replace(link, bandwidth=bandwidth) if pair[0] == tier else link
                  for pair, link in self.direct.items()}
        return replace(self, links=tuple(links), direct=direct)

    def named_links(self) -> list[tuple[str, str, LinkEstimate]]:
        """Every link the planner knows, as (from tier, to tier, figures): neighbours, then direct ones."""
        named = [(a.name, b.name, link) for a, b, link in zip(self.tiers, self.tiers[1:], self.links)]
        return named + [(self.tiers[i].name, self.tiers[j].name, link) for (i, j), link in sorted(self.direct.items())]


def visited_tiers(computing: Sequence[int]) -> list[int]:
    """The tiers a request visits: the edge always (it sends the input even when it computes nothing)."""
    return [0, *(t for t in computing if t != 0)]


def topology_from_cluster(cluster: ClusterSpec, *,
                          measured_links: Mapping[tuple[str, str], LinkEstimate] | None = None,
                          measured_slowdowns: Mapping[str, float] | None = None,
                          costs: RuntimeCosts | None = None) -> Topology:
    """Tiers and links of a cluster file.

    Link figures are the file's emulated bandwidth, latency, jitter and loss. ``measured_links[(source,
    target)]`` (node names), e.g. the bandwidth the runtime measured, replaces the file's figures for that
    link. Links past skipped tiers are kept where the file declares them or they were measured. Likewise
    ``measured_slowdowns[node]`` (how much slower than the profile the node was seen to compute) replaces
    the file's ``slowdown``. Replicated tiers are represented by their first node (its links, the slowest
    replica's slowdown).
    """
    groups = tier_groups(cluster)
    slowdowns = measured_slowdowns or {}
    tiers = tuple(Tier(i, tuple(n.name for n in members),
                       compute_scale=max(slowdowns.get(n.name, n.slowdown) for n in members))
                  for i, members in enumerate(groups))
    heads = [members[0].name for members in groups]
    measured = measured_links or {}
    declared = {(link.source, link.target) for link in cluster.links}

    def estimate(pair: tuple[str, str]) -> LinkEstimate:
        spec = cluster.link(*pair)
        figures = measured[pair] if pair in measured else LinkEstimate.from_spec(spec)
        return replace(figures, codecs=pinned_codecs(spec) if pair in declared else None)

    links = tuple(estimate(pair) for pair in zip(heads, heads[1:]))
    direct = {(i, j): estimate((heads[i], heads[j])) for i in range(len(heads)) for j in range(i + 2, len(heads))
              if (heads[i], heads[j]) in declared or (heads[i], heads[j]) in measured}
    base = costs or RuntimeCosts()
    base = replace(base, max_batch=cluster.batching.max_batch)
    return Topology(tiers, links, base, direct)


def pinned_codecs(spec: LinkSpec) -> tuple[str, ...] | None:
    """The codec a cluster file's link names for itself (``codec: raw``), which the planner must keep; None when
    the link names none or says ``auto`` (the plan chooses)."""
    return (spec.codec,) if "codec" in spec.model_fields_set and spec.codec != AUTO else None


def tier_groups(cluster: ClusterSpec) -> list[list[NodeSpec]]:
    """The cluster's nodes by tier, in tier order: the planner's tier i is the i-th group."""
    return [list(members) for _, members in sorted(cluster.tiers().items())]
