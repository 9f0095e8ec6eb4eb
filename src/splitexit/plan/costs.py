"""The planner's cost tables: for one profile, topology and codec set, what every stage (a, b] and every link
costs, as arrays over positions 0 (the input) .. K + 1 (the output), with candidate cut k at position k + 1.

The latency model follows how the runtime spends time on one request at a time (window 1):

* a stage costs a fixed hand-over cost (a lone request finds the stage idle and never waits for company)
  and its compute times the node's slowdown: each segment between candidate cuts runs only for the rows
  still unanswered there, minus one call overhead per segment plus one per *part* the
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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar, cast

import numpy as np

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut
from splitexit.errors import ConfigError
from splitexit.plan.profile import CodecTiming, Profile
from splitexit.plan.topology import Topology

__all__ = ["INPUT_POSITION", "CostTables", "LinkTerms", "cut_at", "position_of"]

#: The search's position of the model input; candidate cut k sits at position k + 1, the output at
#: len(cuts) + 1 (positions index the cost arrays; cuts are what the rest of the system speaks).
INPUT_POSITION = 0


def cut_at(cuts: Sequence[int], position: int) -> Cut:
    """The cut at a search position (``cuts``: the profile's candidate cuts)."""
    if position == INPUT_POSITION:
        return MODEL_INPUT
    return MODEL_OUTPUT if position == len(cuts) + 1 else cuts[position - 1]


def position_of(cuts: Sequence[int], cut: Cut) -> int | None:
    """The search position of ``cut`` (None: not a candidate cut)."""
    if cut is MODEL_INPUT:
        return INPUT_POSITION
    if cut is MODEL_OUTPUT:
        return len(cuts) + 1
    return cuts.index(cut) + 1 if cut in cuts else None

_T = TypeVar("_T")


class LinkTerms(NamedTuple):
    """One link's costs per input, as arrays over (position crossed, codec); inf at the output."""

    latency: np.ndarray  # seconds down and back up, one request at a time
    encode: np.ndarray  # the sender's worker thread: encoding, per replica of the sending tier
    loads: np.ndarray  # the busiest of serialisation down, serialisation up and the receiver's decode


class CostTables:
    """Cost arrays for one profile, topology and codec set, built lazily and kept for every class searched."""

    def __init__(self, profile: Profile, topology: Topology, codecs: Sequence[str] | None) -> None:
        self.profile, self.topology = profile, topology
        self.K = len(profile.cuts)
        self.N = self.K + 2
        position = {cut: i + 1 for i, cut in enumerate(profile.cuts)}
        missing = [c for c in profile.exit_cuts if c not in position]
        if missing:
            raise ConfigError(f"exit cuts {missing} are not among the profile's candidate cuts; "
                              "re-run `splitexit profile`")
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
        #: per tier, codec and position: what crossing there costs on that tier's machine
        self.transfer: list[dict[str, list[CodecTiming]]] = [
            {c: [m.transfers[p].codecs[c] for p in range(self.K + 1)] for c in self.codecs} for m in self.machines]
        self._memo: dict[tuple[object, ...], object] = {}

    def _cached(self, key: tuple[object, ...], build: Callable[[], _T]) -> _T:
        """Arrays reused across the classes a search tries."""
        if key not in self._memo:
            self._memo[key] = build()
        return cast(_T, self._memo[key])

    # ---- probabilities
    def reach(self, active: Sequence[int]) -> np.ndarray:
        """q[p]: fraction of requests still unanswered after position p (its exit, if active, included)."""
        def build() -> np.ndarray:
            leave = np.array(self.exit_position)[self.profile.exits.route(active)]
            return np.array([float(np.mean(leave > p)) for p in range(self.N)])
        return self._cached(("reach", tuple(active)), build)

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
        value = (prefix[b] - prefix[a] + (c0 + call) * q[a] + np.where(b - 1 > a, inner, 0.0)
                 + head_incl[b] - head_incl[a] + np.where(b == K + 1, final, 0.0))
        return np.where(b > a, value * scale, np.inf)

    def stage_latency(self, tier: int, active: Sequence[int], q: np.ndarray, factor: float) -> np.ndarray:
        """Expected seconds per input of stage (a, b] one request at a time: compute after idling, plus the
        hand-over."""
        costs = self.topology.costs
        slowed = costs.compute_overhead * self.topology.tiers[tier].compute_scale
        fixed = q[:, None] * (costs.stage_overhead + slowed)
        return self._cached(("latency", tier, tuple(active), factor),
                            lambda: self.compute(tier, active, q, 1) * factor + fixed)

    def stage_load(self, tier: int, active: Sequence[int], q: np.ndarray) -> np.ndarray:
        """Busy seconds per input of stage (a, b] on one replica of ``tier`` at ``max_batch`` rows per call."""
        costs = self.topology.costs
        batch = costs.max_batch
        fixed = q[:, None] * costs.stage_overhead / batch
        replicas = len(self.topology.tiers[tier].nodes)
        return self._cached(("load", tier, tuple(active)),
                            lambda: (self.compute(tier, active, q, batch) + fixed) / replicas)

    # ---- links
    def link_terms(self, source: int, target: int, hop: int, active: Sequence[int]) -> LinkTerms:
        """The link from tier ``source`` to ``target`` as the ``hop``-th link of a request's path."""
        return self._cached(("link", source, target, hop, tuple(active)),
                            lambda: self._link_terms(source, target, hop, self.reach(active)))

    def _link_terms(self, source: int, target: int, hop: int, q: np.ndarray) -> LinkTerms:
        link = self.topology.link(source, target)
        costs = self.topology.costs
        classes = self.profile.num_classes
        send, receive = self.topology.tiers[source], self.topology.tiers[target]
        replicas = len(receive.nodes)
        shape = (self.N, len(self.codecs))
        latency, encode, loads = np.full(shape, np.inf), np.full(shape, np.inf), np.full(shape, np.inf)
        up = costs.up_bytes(hop, classes)
        for ci, codec in enumerate(self.codecs):
            if link.codecs is not None and codec not in link.codecs:
                continue  # the cluster file names this link's codec: no other may be chosen for it
            out = self.transfer[source][codec]
            into = self.transfer[target][codec]
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
        return LinkTerms(latency, encode, loads)
