"""The cuts the planner may choose from: every cut point of the model, unless there are too many.

Above :data:`MAX_CANDIDATE_CUTS` cut points the multi-tensor cuts go first (inside residual blocks they
carry more bytes than the block's end), and if still too many, each of equal-FLOP bins keeps its cut with
the fewest bytes. Exit cuts always stay: the planner must be able to end a stage at every exit.
"""

from __future__ import annotations

from splitexit.errors import ConfigError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.graph import CutPoint

__all__ = ["MAX_CANDIDATE_CUTS", "candidate_cuts"]

#: Above this many cut points the candidates are coarsened (see the module docstring).
MAX_CANDIDATE_CUTS = 40


def candidate_cuts(net: EarlyExitNet, limit: int = MAX_CANDIDATE_CUTS) -> tuple[int, ...]:
    """The cuts the planner may choose from (see the module docstring), in forward order."""
    if limit < 1:
        raise ConfigError(f"the candidate cut limit must be at least 1, got {limit}")
    points = list(net.graph.cut_points)
    exits = {c.id for c in net.exit_cuts}
    if len(points) > limit:
        points = [c for c in points if len(c.tensors) == 1 or c.id in exits]
    if len(points) > limit:
        total = max(1, net.graph.total_flops)
        bins = max(1, limit - len(exits))
        chosen: dict[int, CutPoint] = {}
        for c in points:
            if c.id in exits:
                continue
            slot = min(bins - 1, int(bins * c.flops_before / total))
            best = chosen.get(slot)
            if best is None or (c.bytes_per_sample, -c.id) <= (best.bytes_per_sample, -best.id):
                chosen[slot] = c
        keep = exits | {c.id for c in chosen.values()}
        points = [c for c in points if c.id in keep]
    return tuple(c.id for c in points)
