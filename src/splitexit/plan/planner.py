"""Choose where to cut, which exits to keep and the codec of every link, from a profile. Pure: no I/O, no clocks.

The chain is a list of tiers: the edge (tier 0), then the workers in the cluster file's order (replicas of
one tier share its stage). A candidate gives every tier a contiguous range of the model's candidate cuts —
possibly empty, in which case the tier is *skipped* and the link from the tier before it to the one after
is the composition of the links in between (bottleneck bandwidth, summed latency and jitter, combined loss)
— plus a set of active early exits (the final exit always answers) and a codec per used link.

The latency model follows how the runtime spends time on one request at a time (window 1):

* a stage costs ``max_wait`` (a lone request waits that long for company when ``max_batch > 1``), a fixed
  hand-over cost, and its compute times the node's slowdown: each segment between candidate cuts runs
  only for the rows still unanswered there, minus one call overhead per segment plus one per *part* the
  stage really calls (the runtime runs the span between two exits as one graph module), plus each active
  head for the rows that reach it;
* a link costs encode (sender) + decode (receiver) + serialisation of the message at the link's bandwidth
  + propagation latency (+ half the jitter, + loss x retransmission timeout) + a software overhead, and the
  same again for the result travelling back up (a small message: logits and the request's trace);
* every term is weighted by the probability that a request gets that far, which the exit table gives
  exactly for any set of active exits.

Throughput is ``1 / max(load)`` over every resource per input: each tier's worker thread (compute at
``max_batch`` rows per call, plus encoding), each link direction's serialisation, each receiver's decode
thread; replicas divide their tier's load.

Exact optimum: for every class of candidates (which tiers compute x which early exits are active) a
dynamic programme over (tier, cut) finds the best cuts and codecs — additive for latency, min-max for
throughput (then, among candidates of that throughput, the lowest latency). The deadline objective keeps
the classes whose best latency meets the deadline and takes the most accurate, ties by latency.
Lossy codecs are treated as free of accuracy loss (int8 moved digits accuracy by less than half a point in
the runtime's system test); pass ``codecs`` to restrict the choice, e.g. to raw ones.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from splitexit.config import ClusterSpec, LinkSpec, NodeSpec
from splitexit.errors import ConfigError
from splitexit.links import in_series, retransmission_timeout
from splitexit.plan.profile import Profile

__all__ = [
    "OBJECTIVES",
    "LinkEstimate",
    "Objective",
    "Plan",
    "PlanResult",
    "PlannedLink",
    "PlannedStage",
    "RuntimeCosts",
    "Tier",
    "Topology",
    "apply_plan",
    "plan",
    "predict",
    "topology_from_cluster",
]

OBJECTIVES = ("latency", "throughput", "deadline")
#: Relative slack when comparing loads in the throughput tie-break (floating-point noise only).
_TOLERANCE = 1e-9
INPUT = 0  # position of the model input; candidate cut k sits at position k + 1, the output at len(cuts) + 1


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class LinkEstimate:
    """One direction's figures for a hop (the runtime emulates both directions alike).

    ``bandwidth`` is bits per second (None: not limited), ``latency`` and ``jitter`` seconds, ``loss`` the
    fraction of messages that need a retransmission. ``origin`` says where the figures come from.
    """

    bandwidth: float | None = None
    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    origin: str = "cluster file"
    emulated: bool = False  # delayed by the runtime's emulation (its sleeps wake late: RuntimeCosts.emulation_overhead)

    @classmethod
    def from_spec(cls, spec: LinkSpec) -> "LinkEstimate":
        return cls(spec.bandwidth, spec.latency, spec.jitter, spec.loss, origin="cluster file", emulated=spec.emulated)

    @classmethod
    def compose(cls, links: Sequence["LinkEstimate"]) -> "LinkEstimate":
        """Links in series (a skipped tier): the narrowest bandwidth, latencies and jitters add, losses combine."""
        if len(links) == 1:
            return links[0]
        return cls(*in_series(links), origin=" + ".join(sorted({link.origin for link in links})),
                   emulated=any(link.emulated for link in links))

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

    The overheads were fitted on a 2-core box against `splitexit run --window 1` (see docs/planning.md);
    message sizes follow today's wire format (a trace stamp per event, results carry the logits).
    """

    max_batch: int = 8
    max_wait: float = 0.002  # seconds a lone request waits at each stage for company (if max_batch > 1)
    stage_overhead: float = 0.0006  # handing a batch to the stage's worker thread and back, per stage visited
    compute_overhead: float = 0.00015  # the runtime's own work inside a stage's timed compute (slowed with it)
    message_overhead: float = 0.00075  # building, writing, reading and decoding one gRPC message, per link direction
    emulation_overhead: float = 0.0008  # per message on an emulated link: its asyncio sleeps wake late
    header_bytes: int = 24  # a batch message around its tensors (plan version, request id, framing)
    stamp_bytes: int = 28  # one (node, event, time) trace stamp
    stamps_first_hop: int = 5  # stamps the edge's batch carries (queued, compute, encode, sent)
    stamps_per_hop: int = 7  # stamps each further node adds before forwarding
    result_bytes: int = 24  # a result message without logits and trace

    def wait(self) -> float:
        return self.max_wait if self.max_batch > 1 else 0.0

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

    def with_bandwidth(self, bandwidth: float | None, tier: int = 0) -> "Topology":
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
    groups = _tier_groups(cluster)
    slowdowns = measured_slowdowns or {}
    tiers = tuple(Tier(i, tuple(n.name for n in members),
                       compute_scale=max(slowdowns.get(n.name, n.slowdown) for n in members))
                  for i, members in enumerate(groups))
    heads = [members[0].name for members in groups]
    measured = measured_links or {}
    declared = {(link.source, link.target) for link in cluster.links}

    def estimate(pair: tuple[str, str]) -> LinkEstimate:
        return measured[pair] if pair in measured else LinkEstimate.from_spec(cluster.link(*pair))

    links = tuple(estimate(pair) for pair in zip(heads, heads[1:]))
    direct = {(i, j): estimate((heads[i], heads[j])) for i in range(len(heads)) for j in range(i + 2, len(heads))
              if (heads[i], heads[j]) in declared or (heads[i], heads[j]) in measured}
    base = costs or RuntimeCosts()
    base = replace(base, max_batch=cluster.batching.max_batch, max_wait=cluster.batching.max_wait)
    return Topology(tiers, links, base, direct)


def _tier_groups(cluster: ClusterSpec) -> list[list[NodeSpec]]:
    return [list(members) for _, members in sorted(cluster.tiers().items())]


@dataclass(frozen=True)
class Objective:
    """``latency`` (expected, exit-aware), ``throughput`` (bottleneck), or ``deadline`` (best accuracy within it)."""

    kind: Literal["latency", "throughput", "deadline"] = "latency"
    deadline: float | None = None  # seconds; required for "deadline"

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.kind!r}; use one of {', '.join(OBJECTIVES)}")
        if self.kind == "deadline" and not (self.deadline is not None and self.deadline > 0):
            raise ConfigError("the deadline objective needs a positive deadline, e.g. --deadline 50ms")


# ------------------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class PlannedStage:
    """Tier ``tier`` runs the model from cut ``start`` to cut ``end`` (None: the input / the output).

    ``compute_ms`` is the expected compute of one request that reaches the stage (slowdown and idle factor
    included): what the runtime's trace measures between a stage's ``compute_start`` and ``compute_end``.
    """

    tier: int
    nodes: tuple[str, ...]
    start: int | None
    end: int | None
    compute_ms: float = 0.0


@dataclass(frozen=True)
class PlannedLink:
    """A used link: what crosses it (cut ``None``: the model input), in which codec, and how much per input."""

    source_tier: int
    target_tier: int
    source: str
    target: str
    cut: int | None
    codec: str
    bytes_per_input: float  # expected wire bytes per input on the way down (reach probability included)
    via: tuple[str, ...] = ()  # skipped nodes this link stands for


@dataclass(frozen=True)
class Plan:
    """Where every tier's stage starts and ends, the active exits, a codec per used link, and predictions.

    ``stages`` lists the tiers that compute, in chain order; ``skipped`` names the nodes that compute
    nothing (an empty range: a skipped edge still sends the input; skipped workers are left out).
    ``active_exits`` are the early exits evaluated; the final exit always answers. Predictions are for
    one request at a time: ``latency_ms`` is the expected end-to-end latency, ``throughput_per_s`` the
    bottleneck's capacity at ``max_batch`` rows per call.
    """

    objective: str
    stages: tuple[PlannedStage, ...]
    links: tuple[PlannedLink, ...]
    skipped: tuple[str, ...]
    active_exits: tuple[int, ...]
    latency_ms: float
    throughput_per_s: float
    accuracy: float
    exit_rates: tuple[float, ...]
    bottleneck: str
    deadline_ms: float | None = None
    label: str = ""

    @property
    def bytes_per_input(self) -> tuple[float, ...]:
        return tuple(link.bytes_per_input for link in self.links)

    @property
    def meets_deadline(self) -> bool:
        return self.deadline_ms is None or self.latency_ms <= self.deadline_ms * (1 + _TOLERANCE)

    @property
    def edge_computes(self) -> bool:
        return bool(self.stages) and self.stages[0].tier == 0

    def ends_at(self) -> dict[int, int | str | None]:
        """Per computing tier, the cut its stage ends at (None for the last); ``"input"`` for a skipped edge."""
        ends: dict[int, int | str | None] = {} if self.edge_computes else {0: "input"}
        for stage in self.stages:
            ends[stage.tier] = stage.end
        return ends

    def describe(self) -> str:
        def where(cut: int | None, edge: str) -> str:
            return edge if cut is None else f"cut {cut}"
        return " → ".join(f"{'|'.join(s.nodes)}[{where(s.start, 'input')}..{where(s.end, 'output')}]"
                          for s in self.stages)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["describe"] = self.describe()
        data["meets_deadline"] = self.meets_deadline
        return data


@dataclass(frozen=True)
class PlanResult:
    """The best plan, the best of each other class of candidates (ranked), and the two baselines."""

    objective: Objective
    best: Plan
    candidates: tuple[Plan, ...]  # best first; one per (computing tiers, active exits) class
    edge_only: Plan
    cloud_only: Plan

    def speedup(self, baseline: Plan) -> float:
        """How much better the best plan is than ``baseline`` on the objective's own metric (>1: better)."""
        if self.objective.kind == "throughput":
            return self.best.throughput_per_s / baseline.throughput_per_s if baseline.throughput_per_s else math.inf
        return baseline.latency_ms / self.best.latency_ms if self.best.latency_ms else math.inf


# ------------------------------------------------------------------------------------------ the model
class _Costs:
    """Cost arrays for one profile, topology and codec set; positions 0 (input) .. K + 1 (output)."""

    def __init__(self, profile: Profile, topology: Topology, codecs: Sequence[str] | None):
        self.profile, self.topology = profile, topology
        self.K = len(profile.cuts)
        self.N = self.K + 2
        position = {cut: i + 1 for i, cut in enumerate(profile.cuts)}
        missing = [c for c in profile.exit_cuts if c not in position]
        if missing:
            raise ConfigError(f"exit cuts {missing} are not among the profile's candidate cuts; re-run `splitexit profile`")
        self.exit_position = [position[c] for c in profile.exit_cuts] + [self.K + 1]
        self.exit_at = {p: i for i, p in enumerate(self.exit_position[:-1])}
        self.machines = [profile.machine(t.nodes[0]) for t in topology.tiers]
        available = list(profile.timing.transfers[0].codecs)
        wanted = list(codecs) if codecs is not None else available
        unknown = [c for c in wanted if c not in available]
        if unknown or not wanted:
            raise ConfigError(f"codecs {unknown or wanted} were not profiled; choose among {', '.join(available)} "
                              "or re-run `splitexit profile --codecs ...`")
        self.codecs = wanted
        for machine in self.machines:
            if len(machine.segments) != self.K + 1 or len(machine.transfers) != self.K + 1:
                raise ConfigError("the profile's segments do not match its cuts; re-run `splitexit profile --force`")
        self._transfer = [{c: [m.transfers[p].codecs[c] for p in range(self.K + 1)] for c in self.codecs}
                          for m in self.machines]
        self._memo: dict[tuple, object] = {}

    def _cached(self, key: tuple, build):  # noqa: ANN001, ANN202 - a tiny memo for arrays reused across classes
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # ---- probabilities
    def reach(self, active: Sequence[int]) -> np.ndarray:
        """q[p]: fraction of requests still unanswered after position p (its exit, if active, included)."""
        def build() -> np.ndarray:
            leave = np.array(self.exit_position)[self.profile.exits.route(active)]
            return np.array([float(np.mean(leave > p)) for p in range(self.N)])
        return self._cached(("reach", tuple(active)), build)  # type: ignore[return-value]

    # ---- compute
    def compute(self, tier: int, active: Sequence[int], q: np.ndarray, batch: int) -> np.ndarray:
        """Expected warm seconds per input of a stage (a, b] on ``tier`` (slowdown included); inf where a >= b,
        at ``batch`` rows per call."""
        m, K, N = self.machines[tier], self.K, self.N
        scale = self.topology.tiers[tier].compute_scale
        c0 = m.call_overhead.median / batch
        seg = np.array([m.segments[s].at(batch) / batch for s in range(K + 1)])
        prefix = np.concatenate([[0.0], np.cumsum(q[:K + 1] * np.maximum(seg - c0, 0.0))])  # sum over s < p
        part = np.zeros(N)
        for p in self.exit_at:
            part[p] = c0 * q[p]
        part_incl = np.cumsum(part)
        head = np.zeros(N)
        for j in active:
            p = self.exit_position[j]
            head[p] = q[p - 1] * m.heads[j].at(batch) / batch
        head_incl = np.cumsum(head)
        final = q[K] * m.heads[-1].at(batch) / batch
        a = np.arange(N)[:, None]
        b = np.arange(N)[None, :]
        inner = part_incl[np.maximum(b - 1, 0)] - part_incl[a]
        call = m.stage_call_at(batch) / batch
        value = prefix[b] - prefix[a] + (c0 + call) * q[a] + np.where(b - 1 > a, inner, 0.0) + head_incl[b] - head_incl[a]
        value = value + np.where(b == K + 1, final, 0.0)
        return np.where(b > a, value * scale, np.inf)

    def stage_latency(self, tier: int, active: Sequence[int], q: np.ndarray, factor: float) -> np.ndarray:
        """Expected seconds per input of stage (a, b] one request at a time: compute after idling, plus waits."""
        costs = self.topology.costs
        slowed = costs.compute_overhead * self.topology.tiers[tier].compute_scale
        fixed = q[:, None] * (costs.wait() + costs.stage_overhead + slowed)
        return self._cached(("latency", tier, tuple(active), factor),  # type: ignore[return-value]
                            lambda: self.compute(tier, active, q, 1) * factor + fixed)

    def stage_load(self, tier: int, active: Sequence[int], q: np.ndarray) -> np.ndarray:
        costs = self.topology.costs
        batch = costs.max_batch
        fixed = q[:, None] * costs.stage_overhead / batch
        return self._cached(("load", tier, tuple(active)),  # type: ignore[return-value]
                            lambda: (self.compute(tier, active, q, batch) + fixed)
                            / len(self.topology.tiers[tier].nodes))

    # ---- links: arrays over (position, codec); inf at the output (nothing crosses it)
    def link_terms(self, source: int, target: int, hop: int, active: Sequence[int]) -> dict[str, np.ndarray]:
        return self._cached(("link", source, target, hop, tuple(active)),  # type: ignore[return-value]
                            lambda: self._link_terms(source, target, hop, self.reach(active)))

    def _link_terms(self, source: int, target: int, hop: int, q: np.ndarray) -> dict[str, np.ndarray]:
        link = self.topology.link(source, target)
        costs = self.topology.costs
        classes = self.profile.num_classes
        send, receive = self.topology.tiers[source], self.topology.tiers[target]
        replicas = len(receive.nodes)
        shape = (self.N, len(self.codecs))
        latency, encode, loads = np.full(shape, np.inf), np.full(shape, np.inf), np.full(shape, np.inf)
        up = costs.up_bytes(hop, classes)
        for ci, codec in enumerate(self.codecs):
            out = self._transfer[source][codec]
            into = self._transfer[target][codec]
            for p in range(self.K + 1):
                wire = out[p].bytes + costs.down_bytes(hop)
                enc = out[p].encode_s * send.codec_scale
                dec = into[p].decode_s * receive.codec_scale
                latency[p, ci] = q[p] * (enc + dec + link.serialisation(wire) + link.serialisation(up)
                                         + 2 * (link.delay() + costs.per_message(link)))
                encode[p, ci] = q[p] * enc / len(send.nodes)
                batched = out[p].bytes + costs.down_bytes(hop) / costs.max_batch
                loads[p, ci] = q[p] * max(link.serialisation(batched) / replicas,
                                          link.serialisation(up) / replicas, dec / replicas)
        return {"latency": latency, "encode": encode, "loads": loads}


def _visited(tiers: Sequence[int]) -> list[int]:
    """The tiers a request visits: the edge always (it sends the input even when it computes nothing)."""
    return [0, *(t for t in tiers if t != 0)]


# ------------------------------------------------------------------------------------------ predict
Factors = Mapping[int, float]  # tier -> how much slower its batch-1 compute runs after idling (>= 1)


def predict(profile: Profile, topology: Topology, stages: Sequence[tuple[int, int | None, int | None]],
            active_exits: Iterable[int], codecs: Sequence[str], *, objective: Objective = Objective(),
            label: str = "") -> Plan:
    """The predictions for one candidate, computed request by request (independently of the planner's DP).

    ``stages`` are ``(tier, start, end)`` for the tiers that compute, in chain order, covering the model
    from input (None) to output (None) without gaps. ``codecs`` has one entry per used link: the input
    link first when tier 0 is not among the stages, then one between consecutive stages.

    A worker that idles between requests computes slower (``MachineProfile.idle_factors``), and how long it
    idles depends on the latency being predicted: the factors are found by fixed-point iteration, starting
    from the coldest (largest) factor.
    """
    candidate = _Candidate.of(profile, topology, stages, active_exits, codecs)
    costs = _Costs(profile, topology, list(dict.fromkeys(codecs)) or None)
    factors = _coldest(costs, candidate.tiers)
    for _ in range(MAX_FIXED_POINT):
        plan_, gaps = _evaluate(costs, candidate, factors, objective, label)
        updated = _factors(costs, gaps)
        if _settled(updated, factors):
            break
        factors = updated
    return plan_


#: Rounds of the idle-factor fixed point (factors settle in two or three: they saturate after ~10 ms idle).
MAX_FIXED_POINT = 8


@dataclass(frozen=True)
class _Candidate:
    spans: tuple[tuple[int, int, int], ...]  # (tier, start position, end position) of the computing tiers
    active: tuple[int, ...]
    codecs: tuple[str, ...]

    @property
    def tiers(self) -> list[int]:
        return [t for t, _, _ in self.spans]

    @classmethod
    def of(cls, profile: Profile, topology: Topology, stages: Sequence[tuple[int, int | None, int | None]],
           active_exits: Iterable[int], codecs: Sequence[str]) -> "_Candidate":
        K = len(profile.cuts)
        position = {None: 0, **{cut: i + 1 for i, cut in enumerate(profile.cuts)}}
        spans = []
        for tier, start, end in stages:
            a, b = position.get(start), K + 1 if end is None else position.get(end)
            if a is None or b is None:
                raise ConfigError(f"stage {start}..{end} uses a cut that is not a candidate: {list(profile.cuts)}")
            spans.append((tier, a, b))
        tiers = [t for t, _, _ in spans]
        if (not spans or spans[0][1] != 0 or spans[-1][2] != K + 1
                or any(x[2] != y[1] for x, y in zip(spans, spans[1:])) or any(a >= b for _, a, b in spans)
                or tiers != sorted(set(tiers)) or not 0 <= tiers[0] or tiers[-1] >= len(topology.tiers)):
            raise ConfigError(f"stages {list(stages)} must cover input to output in forward order on distinct tiers")
        links = len(_visited(tiers)) - 1
        if len(codecs) != links:
            raise ConfigError(f"{links} links need {links} codecs, got {list(codecs)}")
        active = tuple(sorted(set(active_exits)))
        early = profile.exits.early_exits
        if any(not 0 <= j < early for j in active):
            raise ConfigError(f"active exits {list(active)} must be early exits 0..{early - 1}")
        return cls(tuple(spans), active, tuple(codecs))


def _coldest(costs: _Costs, tiers: Iterable[int]) -> dict[int, float]:
    return {t: costs.machines[t].idle_factor(math.inf) for t in tiers}


def _factors(costs: _Costs, gaps: Mapping[int, float]) -> dict[int, float]:
    return {t: costs.machines[t].idle_factor(gap) for t, gap in gaps.items()}


def _settled(a: Factors, b: Factors) -> bool:
    return all(math.isclose(a[t], b[t], rel_tol=1e-9, abs_tol=1e-12) for t in a)


def _evaluate(costs: _Costs, candidate: _Candidate, factors: Factors, objective: Objective,
              label: str) -> tuple[Plan, dict[int, float]]:
    """The plan's predictions for given idle factors, and each computing tier's idle time between requests."""
    profile, topology = costs.profile, costs.topology
    K = costs.K
    spans, active, codecs = candidate.spans, candidate.active, candidate.codecs
    tiers = candidate.tiers
    visited = _visited(tiers)
    rt = topology.costs
    table = profile.exits
    leave = table.route(active)
    exit_pos = costs.exit_position
    q = costs.reach(active)
    # Latency, one sample at a time: walk its path, pay what it meets, stop where it is answered.
    hops = list(zip(visited, visited[1:]))
    latencies = np.zeros(table.samples)
    busy = dict.fromkeys(tiers, 0.0)  # expected seconds each tier's worker really computes per input
    slowed = dict.fromkeys(tiers, 0.0)  # the same with its slowdown: what the trace shows, per input
    for j in range(table.early_exits + 1):
        answer = exit_pos[j]
        share = float(np.mean(leave == j))
        total, up = 0.0, 0.0
        if tiers[0] != 0:  # the edge sends the input as it is
            total += _down(costs, 0, tiers[0], 0, 0, codecs[0])
            up += _up(costs, 0, tiers[0], 0)
        for index, (tier, a, b) in enumerate(spans):
            compute = (_stage_path(costs, tier, a, b, answer, active) * factors[tier]
                       + rt.compute_overhead * topology.tiers[tier].compute_scale)
            # the emulation sleeps away the slowdown: the worker idles through it too
            busy[tier] += share * compute / topology.tiers[tier].compute_scale
            slowed[tier] += share * compute
            total += compute + rt.wait() + rt.stage_overhead
            if answer <= b:
                break
            hop = visited.index(tier)
            nxt = spans[index + 1][0]
            total += _down(costs, tier, nxt, b, hop, codecs[hop])
            up += _up(costs, tier, nxt, hop)
        latencies[leave == j] = total + up
    latency = float(latencies.mean())
    # One request at a time, a tier reached by a fraction q of requests is called every latency / q seconds.
    gaps = {t: max(0.0, latency / q[a] - busy[t] / q[a]) if q[a] > 0 else math.inf for t, a, _ in spans}
    # Throughput: every resource's busy time per input.
    loads: dict[str, float] = {}
    batch = rt.max_batch
    for tier, a, b in spans:
        loads[f"compute on {topology.tiers[tier].name}"] = float(costs.stage_load(tier, active, q)[a, b])
    if tiers[0] != 0:
        loads[f"compute on {topology.tiers[0].name}"] = 0.0
    links = []
    for hop, (u, v) in enumerate(hops):
        p = 0 if hop == 0 and tiers[0] != 0 else spans[tiers.index(u)][2]
        codec = codecs[hop]
        link = topology.link(u, v)
        send, receive = topology.tiers[u], topology.tiers[v]
        transfer = costs._transfer[u][codec][p]
        decode = costs._transfer[v][codec][p].decode_s * receive.codec_scale
        loads[f"compute on {send.name}"] += q[p] * transfer.encode_s * send.codec_scale / len(send.nodes)
        replicas = len(receive.nodes)
        batched = transfer.bytes + rt.down_bytes(hop) / batch
        loads[f"link {send.nodes[0]}→{receive.nodes[0]}"] = q[p] * link.serialisation(batched) / replicas
        loads[f"link {receive.nodes[0]}→{send.nodes[0]} (results)"] = \
            q[p] * link.serialisation(rt.up_bytes(hop, profile.num_classes)) / replicas
        loads[f"decode on {receive.name}"] = q[p] * decode / replicas
        via = tuple(n for t in topology.tiers[u + 1:v] for n in t.nodes)
        links.append(PlannedLink(u, v, send.nodes[0], receive.nodes[0], None if p == 0 else profile.cuts[p - 1], codec,
                                 float(q[p] * (transfer.bytes + rt.down_bytes(hop))), via))
    bottleneck = max(loads, key=lambda k: loads[k])
    throughput = 1.0 / loads[bottleneck] if loads[bottleneck] > 0 else math.inf
    planned = tuple(PlannedStage(t, topology.tiers[t].nodes, None if a == 0 else profile.cuts[a - 1],
                                 None if b == K + 1 else profile.cuts[b - 1],
                                 compute_ms=slowed[t] / q[a] * 1e3 if q[a] > 0 else 0.0)
                    for t, a, b in spans)
    used = set(tiers)
    skipped = tuple(n for t in topology.tiers if t.index not in used for n in t.nodes)
    result = Plan(objective=objective.kind, stages=planned, links=tuple(links), skipped=skipped, active_exits=active,
                  latency_ms=latency * 1e3, throughput_per_s=throughput, accuracy=table.accuracy(active),
                  exit_rates=table.exit_rates(active), bottleneck=bottleneck,
                  deadline_ms=objective.deadline * 1e3 if objective.deadline is not None else None, label=label)
    return result, gaps


def _stage_path(costs: _Costs, tier: int, a: int, b: int, answer: int, active: Sequence[int]) -> float:
    """Warm compute seconds (slowdown included) a sample answered at position ``answer`` spends in stage (a, b]."""
    m = costs.machines[tier]
    c0 = m.call_overhead.median
    stop = min(b, answer)
    seconds = sum(max(m.segments[s].at(1) - c0, 0.0) for s in range(a, stop))
    parts = 1 + sum(1 for e in costs.exit_at if a < e < stop)
    seconds += c0 * parts + m.stage_call_at(1)
    seconds += sum(m.heads[j].at(1) for j in active if a < costs.exit_position[j] <= stop)
    if stop == costs.K + 1:
        seconds += m.heads[-1].at(1)
    return seconds * costs.topology.tiers[tier].compute_scale


def _down(costs: _Costs, u: int, v: int, p: int, hop: int, codec: str) -> float:
    rt = costs.topology.costs
    link = costs.topology.link(u, v)
    out = costs._transfer[u][codec][p]
    into = costs._transfer[v][codec][p]
    return (out.encode_s * costs.topology.tiers[u].codec_scale + into.decode_s * costs.topology.tiers[v].codec_scale
            + link.serialisation(out.bytes + rt.down_bytes(hop)) + link.delay() + rt.per_message(link))


def _up(costs: _Costs, u: int, v: int, hop: int) -> float:
    rt = costs.topology.costs
    link = costs.topology.link(u, v)
    return link.serialisation(rt.up_bytes(hop, costs.profile.num_classes)) + link.delay() + rt.per_message(link)


# ------------------------------------------------------------------------------------------ the DP
@dataclass(frozen=True)
class _Choice:
    tiers: tuple[int, ...]
    bounds: tuple[int, ...]  # positions: 0, end of each computing tier (the last is K + 1)
    codecs: tuple[str, ...]
    value: float


def _solve(costs: _Costs, tiers: Sequence[int], active: Sequence[int], *, kind: str,
           factors: Factors | None = None, cap: float | None = None) -> _Choice | None:
    """Best bounds and codecs for one class. ``kind``: "latency" (sum) or "load" (max); ``factors``: each
    tier's idle factor (latency only; default 1); ``cap`` bounds every load (the throughput tie-break: least
    latency among candidates whose bottleneck is at most ``cap``)."""
    q = costs.reach(active)
    N, K = costs.N, costs.K
    visited = _visited(tiers)
    limit = np.inf if cap is None else cap * (1 + _TOLERANCE) + 1e-15
    loads = {t: costs.stage_load(t, active, q) for t in tiers} if kind == "load" or cap is not None else {}
    stages = {t: costs.stage_latency(t, active, q, (factors or {}).get(t, 1.0)) for t in tiers} \
        if kind == "latency" else {}
    combine = np.add if kind == "latency" else np.maximum
    value = np.full(N, np.inf)
    trace: list[tuple[np.ndarray, np.ndarray]] = []
    first_codec: str | None = None
    if tiers[0] == 0:
        value[INPUT] = 0.0
    else:
        terms = costs.link_terms(0, tiers[0], 0, active)
        ok = np.maximum(terms["encode"][INPUT], terms["loads"][INPUT]) <= limit
        score = terms["latency"][INPUT] if kind == "latency" else np.maximum(terms["encode"][INPUT], terms["loads"][INPUT])
        score = np.where(ok, score, np.inf)
        if not np.isfinite(score).any():
            return None
        best = int(np.argmin(score))
        value[INPUT], first_codec = float(score[best]), costs.codecs[best]
    for i in range(len(tiers) - 1):
        u, v = tiers[i], tiers[i + 1]
        hop = visited.index(u)
        terms = costs.link_terms(u, v, hop, active)
        if kind == "latency":
            total = value[:, None, None] + stages[u][:, :, None] + terms["latency"][None, :, :]
        else:
            total = np.maximum(value[:, None, None],
                               np.maximum(loads[u][:, :, None] + terms["encode"][None, :, :], terms["loads"][None, :, :]))
        if cap is not None:
            feasible = np.maximum(loads[u][:, :, None] + terms["encode"][None, :, :], terms["loads"][None, :, :]) <= limit
            total = np.where(feasible, total, np.inf)
        flat = total.transpose(1, 0, 2).reshape(N, -1)  # row b: every (start a, codec) pair, a-major
        pick = np.argmin(flat, axis=1)
        value = flat[np.arange(N), pick]
        trace.append((pick // len(costs.codecs), pick % len(costs.codecs)))
    last = tiers[-1]
    end = stages[last][:, K + 1] if kind == "latency" else loads[last][:, K + 1]
    total = combine(value, end)
    if cap is not None:
        total = np.where(loads[last][:, K + 1] <= limit, total, np.inf)
    a = int(np.argmin(total))
    if not np.isfinite(total[a]):
        return None
    bounds = [K + 1, a]
    chosen: list[str] = []
    for starts, codec_index in reversed(trace):
        b = bounds[-1]
        chosen.append(costs.codecs[int(codec_index[b])])
        bounds.append(int(starts[b]))
    bounds.reverse()
    chosen.reverse()
    if first_codec is not None:
        chosen.insert(0, first_codec)
    return _Choice(tuple(tiers), tuple(bounds), tuple(chosen), float(total[a]))


def _stages_of(profile: Profile, choice: _Choice) -> list[tuple[int, int | None, int | None]]:
    K = len(profile.cuts)
    cut = lambda p: None if p in (0, K + 1) else profile.cuts[p - 1]  # noqa: E731
    return [(t, cut(a), cut(b)) for t, a, b in zip(choice.tiers, choice.bounds, choice.bounds[1:])]


def plan(profile: Profile, topology: Topology, objective: Objective = Objective(), *,
         codecs: Sequence[str] | None = None, exit_sets: Iterable[Sequence[int]] | None = None,
         edge_may_skip: bool = True, top: int = 5) -> PlanResult:
    """The exact best plan for ``objective``, the best of the other candidate classes, and the baselines.

    A class is (which tiers compute, which early exits are active). ``exit_sets`` restricts the active exit
    sets tried (default: every subset of the exits that can fire). ``edge_may_skip=False`` keeps a stage on
    the edge (today's runtime cannot serve an edge that computes nothing). Deterministic.
    """
    costs = _Costs(profile, topology, codecs)
    usable = profile.exits.usable()
    if exit_sets is None:
        sets = [s for r in range(len(usable) + 1) for s in itertools.combinations(usable, r)]
    else:
        sets = [tuple(sorted(set(s))) for s in exit_sets]
        early = profile.exits.early_exits
        if any(not 0 <= j < early for s in sets for j in s) or not sets:
            raise ConfigError(f"exit sets must be non-empty lists of early exits 0..{early - 1}, got {sets}")
    count = len(topology.tiers)
    classes = [tiers for r in range(1, count + 1) for tiers in itertools.combinations(range(count), r)
               if edge_may_skip or tiers[0] == 0]
    plans = [p for tiers in classes for active in sets
             for p in [_class_best(costs, tiers, active, objective)] if p is not None]
    if not plans:
        raise ConfigError("no candidate plan exists for this profile and cluster")
    ranked = sorted(plans, key=lambda p: _rank(p, objective))
    best = replace(ranked[0], label="best")

    def baseline(tiers: tuple[int, ...], label: str) -> Plan:
        own = [p for p in ranked if tuple(s.tier for s in p.stages) == tiers]
        if not own:  # the edge-only class always exists; cloud-only is searched even when edges may not skip
            own = [p for active in sets for p in [_class_best(costs, tiers, active, objective)] if p is not None]
            own.sort(key=lambda p: _rank(p, objective))
        return replace(own[0], label=label)

    return PlanResult(objective=objective, best=best, candidates=(best, *ranked[1:max(1, top)]),
                      edge_only=baseline((0,), "edge-only"), cloud_only=baseline((count - 1,), "cloud-only"))


def _class_best(costs: _Costs, tiers: Sequence[int], active: Sequence[int], objective: Objective) -> Plan | None:
    """The best plan of one class. The DP is exact for given idle factors; the factors depend on the latency
    of the plan chosen, so the DP runs again with the factors of its last choice until they settle."""
    factors = _coldest(costs, tiers)
    result = None
    for _ in range(MAX_FIXED_POINT):
        choice = _best_choice(costs, tiers, active, objective.kind, factors)
        if choice is None:
            return None
        candidate = _Candidate.of(costs.profile, costs.topology, _stages_of(costs.profile, choice), active,
                                  choice.codecs)
        result, gaps = _evaluate(costs, candidate, factors, objective, "")
        updated = _factors(costs, gaps)
        if _settled(updated, factors):
            break
        factors = updated
    return result


def _best_choice(costs: _Costs, tiers: Sequence[int], active: Sequence[int], kind: str,
                 factors: Factors) -> _Choice | None:
    if kind == "throughput":
        bottleneck = _solve(costs, tiers, active, kind="load")
        if bottleneck is None:
            return None
        return _solve(costs, tiers, active, kind="latency", factors=factors, cap=bottleneck.value) or bottleneck
    return _solve(costs, tiers, active, kind="latency", factors=factors)


def _rank(p: Plan, objective: Objective) -> tuple[float, ...]:
    if objective.kind == "throughput":
        return (-p.throughput_per_s, p.latency_ms, -p.accuracy)
    if objective.kind == "deadline":
        return (0.0, -p.accuracy, p.latency_ms) if p.meets_deadline else (1.0, p.latency_ms, -p.accuracy)
    return (p.latency_ms, -p.accuracy, -p.throughput_per_s)


# ------------------------------------------------------------------------------------------ applying
def apply_plan(cluster: ClusterSpec, plan: Plan) -> ClusterSpec:
    """The cluster file that serves ``plan``: ``ends_at`` per tier, link codecs, skipped workers left out.

    Workers of skipped tiers (and of tiers after the last computing one) are dropped; the link that
    replaces a chain through them is composed (narrowest bandwidth, summed latency and jitter, combined
    loss) from the file's links along the first replica of each dropped tier. A skipped edge stays (it is
    the entry) with ``ends_at: input``: its stage is empty and the input crosses the first link.
    Active exits are not written: the cluster file has no place for them yet.
    """
    groups = _tier_groups(cluster)
    ends = plan.ends_at()
    computing = [s.tier for s in plan.stages]
    if not computing or computing[-1] >= len(groups):
        raise ConfigError(f"the plan needs {computing[-1] + 1 if computing else 0} tiers; the cluster has {len(groups)}")
    for stage in plan.stages:
        if set(stage.nodes) != {n.name for n in groups[stage.tier]}:
            raise ConfigError(f"the plan puts a stage on {', '.join(stage.nodes)} but tier {stage.tier} of the cluster "
                              f"is {', '.join(n.name for n in groups[stage.tier])}; plan for this cluster file")
    kept = sorted({0, *computing})
    explicit_tiers = any(n.tier is not None for n in cluster.nodes)
    nodes = []
    for new_index, tier in enumerate(kept):
        for node in groups[tier]:
            update: dict[str, object] = {"ends_at": ends.get(tier)}
            if node.role == "worker":
                update["tier"] = new_index if explicit_tiers else None
            nodes.append(node.model_copy(update=update))
    codec_of = {(l.source_tier, l.target_tier): l.codec for l in plan.links}
    links = []
    for u, v in zip(kept, kept[1:]):
        codec = codec_of.get((u, v), cluster.codec)
        for source in groups[u]:
            for target in groups[v]:
                path = [source, *(groups[t][0] for t in range(u + 1, v)), target]
                specs = [cluster.link(a.name, b.name) for a, b in zip(path, path[1:])]
                links.append(_composed_link(source.name, target.name, specs, codec))
    data = cluster.model_dump(mode="json", by_alias=True, exclude={"nodes", "links"})
    data["nodes"] = [n.model_dump(mode="json", exclude_none=True) for n in nodes]
    data["links"] = links
    return ClusterSpec.model_validate(data)


def _composed_link(source: str, target: str, specs: Sequence[LinkSpec], codec: str) -> dict[str, object]:
    if len(specs) == 1:  # neighbours already: the file's own link, with the plan's codec
        return specs[0].model_copy(update={"codec": codec}).model_dump(mode="json", by_alias=True, exclude_none=True)
    link: dict[str, object] = {"from": source, "to": target, "codec": codec}
    figures = in_series(specs)
    link.update({name: value for name, value in figures._asdict().items() if value})
    return link
