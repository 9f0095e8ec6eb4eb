"""Candidate cuts: every cut point of a small model; exits kept and equal-FLOP bins coarsened for a big one."""

from __future__ import annotations

from splitexit import EarlyExitNet
from splitexit.plan.candidates import candidate_cuts


def test_candidate_cuts_keep_exits_and_coarsen_big_models(net: EarlyExitNet) -> None:
    every = candidate_cuts(net)
    assert every == tuple(c.id for c in net.graph.cut_points)
    few = candidate_cuts(net, limit=5)
    assert len(few) <= 5 and list(few) == sorted(few)
    assert {c.id for c in net.exit_cuts} <= set(few)
    exits = {c.id for c in net.exit_cuts}
    bins = 5 - len(exits)
    total = net.graph.total_flops
    slot = {c.id: min(bins - 1, int(bins * c.flops_before / total)) for c in net.graph.cut_points}
    for kept in set(few) - exits:
        rivals = [c.bytes_per_sample for c in net.graph.cut_points if slot[c.id] == slot[kept] and c.id not in exits]
        assert net.graph.cut(kept).bytes_per_sample == min(rivals), "each FLOP bin keeps its narrowest cut"
    assert len(set(few) - exits) == len({slot[c] for c in few if c not in exits})

