"""Which node runs which range of cuts, until the planner chooses (the default the cluster file implies).

Nodes take the chain in order. A node's stage ends where the cluster file says (``ends_at``), or by
default at an exit: the package's exits are spread over the nodes, one per node where possible. With
more nodes than exits, extra cuts split the most expensive remaining range at its FLOP midpoint.

Entry and nodes compute the placement independently from the same package and cluster file; its
``version`` (a hash of the package weights and the ranges) travels with every request so a node can
refuse work planned for another layout.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from splitexit.config import ClusterSpec
from splitexit.errors import ClusterError, CutError
from splitexit.model.exits import EarlyExitNet

__all__ = ["Placement", "StagePlacement", "default_placement"]


@dataclass(frozen=True)
class StagePlacement:
    node: str
    start: int | None  # cut the stage starts at (None: the model input)
    end: int | None  # cut it ends at (None: the model output)


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlacement, ...]
    version: int

    def of(self, node: str) -> StagePlacement:
        for stage in self.stages:
            if stage.node == node:
                return stage
        raise ClusterError(f"node {node!r} has no stage in this placement (nodes: "
                           f"{', '.join(s.node for s in self.stages)})")

    def next_after(self, node: str) -> StagePlacement | None:
        names = [s.node for s in self.stages]
        index = names.index(node)
        return self.stages[index + 1] if index + 1 < len(self.stages) else None

    def describe(self) -> str:
        def cut(c: int | None, edge: str) -> str:
            return edge if c is None else f"cut {c}"
        return " → ".join(f"{s.node}[{cut(s.start, 'input')}..{cut(s.end, 'output')}]" for s in self.stages)


def default_placement(net: EarlyExitNet, cluster: ClusterSpec) -> Placement:
    """Cut the net into one stage per node of ``cluster`` (see the module docstring for the rule).

    The version hashes the ranges with the package's weights checksum (``net.weights_sha256``, set by
    save and load), so an entry and a node serving different packages refuse each other's batches.
    """
    nodes = list(cluster.nodes)
    ends = _ends(net, cluster)
    if len(ends) != len(nodes) - 1 or ends != sorted(set(ends)):
        raise ClusterError(f"cannot give each of the {len(nodes)} nodes a stage: stage ends {ends} must be "
                           f"{len(nodes) - 1} distinct cuts in forward order; fix `ends_at` in the cluster file")
    bounds: list[int | None] = [None, *ends, None]
    stages = tuple(StagePlacement(node.name, a, b) for node, a, b in zip(nodes, bounds[:-1], bounds[1:]))
    digest = hashlib.sha256(repr((net.weights_sha256, [(s.node, s.start, s.end) for s in stages])).encode())
    return Placement(stages, version=int.from_bytes(digest.digest()[:8], "big") >> 1)


def _ends(net: EarlyExitNet, cluster: ClusterSpec) -> list[int]:
    nodes = list(cluster.nodes)
    wanted = len(nodes) - 1
    explicit = [n.ends_at for n in nodes[:-1]]
    if any(e is not None for e in explicit):
        if any(e is None for e in explicit):
            raise ClusterError("set `ends_at` on every node but the last, or on none of them")
        try:
            return [net.graph.resolve(e).id for e in explicit]  # type: ignore[arg-type]
        except CutError as exc:
            raise ClusterError(f"cluster file: {exc}") from exc
    exits = [c.id for c in net.exit_cuts]
    if len(exits) >= wanted:
        picks = sorted({min(len(exits) - 1, math.ceil((i + 1) * (len(exits) + 1) / len(nodes)) - 1)
                        for i in range(wanted)})
        if len(picks) == wanted:
            return [exits[p] for p in picks]
        return exits[-wanted:] if wanted else []
    ends = list(exits)
    while len(ends) < wanted:
        extra = _split_heaviest(net, ends)
        if extra is None:
            raise ClusterError(f"the model has too few cut points for {len(nodes)} nodes; use fewer nodes")
        ends = sorted([*ends, extra])
    return ends


def _split_heaviest(net: EarlyExitNet, ends: list[int]) -> int | None:
    """A cut near the FLOP midpoint of the most expensive range between current boundaries."""
    graph = net.graph
    flops = {c.id: c.flops_before for c in graph.cut_points}
    edges = [0.0, *(flops[e] for e in ends), float(graph.total_flops)]
    ranges = sorted(range(len(edges) - 1), key=lambda i: edges[i + 1] - edges[i], reverse=True)
    for i in ranges:
        low, high = edges[i], edges[i + 1]
        middle = (low + high) / 2
        inside = [c for c in graph.cut_points if low < c.flops_before < high and c.id not in ends]
        if inside:
            return min(inside, key=lambda c: (abs(c.flops_before - middle), c.bytes_per_sample)).id
    return None
