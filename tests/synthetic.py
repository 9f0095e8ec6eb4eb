"""Hand-built profiles, topologies and a cluster file for the planner tests: planning is pure, so no model and no
clock."""

from __future__ import annotations

import numpy as np

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut
from splitexit.plan.profile import (
    CodecTiming,
    CutTransfer,
    ExitTable,
    HeadTiming,
    MachineProfile,
    Profile,
    SegmentTiming,
    Timing,
)
from splitexit.plan.topology import LinkEstimate, RuntimeCosts, Tier, Topology


def synthetic_profile(seed: int, *, cuts: int = 4, exits: tuple[int, ...] = (1, 3), samples: int = 60,
                      codecs: tuple[str, ...] = ("raw", "int8+zstd")) -> Profile:
    """A random but plausible profile: cut ids 10, 20, ...; exits at the given cut positions (0-based)."""
    rng = np.random.default_rng(seed)
    cut_ids = tuple(10 * (i + 1) for i in range(cuts))
    bounds: list[Cut] = [MODEL_INPUT, *cut_ids, MODEL_OUTPUT]
    segments = tuple(SegmentTiming(a, b, 1000, {1: Timing.fixed(float(t)), 8: Timing.fixed(float(t) * 3)})
                     for a, b, t in zip(bounds[:-1], bounds[1:], rng.uniform(1e-4, 3e-3, cuts + 1)))
    heads = tuple(HeadTiming(i, cut_ids[p] if p is not None else MODEL_OUTPUT,
                             {1: Timing.fixed(float(t)), 8: Timing.fixed(float(t) * 2)})
                  for i, (p, t) in enumerate(zip([*exits, None], rng.uniform(1e-5, 3e-4, len(exits) + 1))))
    transfers = []
    for cut, raw in zip([MODEL_INPUT, *cut_ids], rng.integers(500, 200_000, cuts + 1)):
        table = {}
        for k, name in enumerate(codecs):
            shrink = 1.0 if k == 0 else float(rng.uniform(0.1, 0.6))
            table[name] = CodecTiming(name, bytes=float(raw) * shrink + 20, encode_s=float(rng.uniform(1e-5, 1e-3)),
                                      decode_s=float(rng.uniform(1e-5, 5e-4)))
        transfers.append(CutTransfer(cut, int(raw), table))
    machine = MachineProfile(key={}, measured_on="hand-built", batch_sizes=(1, 8),
                             call_overhead=Timing.fixed(float(rng.uniform(0, 2e-5))),
                             stage_call={1: Timing.fixed(4e-5), 8: Timing.fixed(5e-5)},
                             idle_factors={0.01: 1.0}, segments=segments, heads=heads,
                             transfers=tuple(transfers))
    confident = rng.random((len(exits), samples)) < rng.uniform(0.2, 0.7, (len(exits), 1))
    correct = rng.random((len(exits) + 1, samples)) < np.linspace(0.7, 0.95, len(exits) + 1)[:, None]
    table = ExitTable(key={}, confident=confident, correct=correct)
    return Profile(model="synthetic", cuts=cut_ids, exit_cuts=tuple(cut_ids[p] for p in exits), num_classes=10,
                   timing=machine, exits=table)


def chain(slowdowns: tuple[float, ...] = (6.0, 1.0, 1.0),
          links: tuple[LinkEstimate, ...] = (LinkEstimate(20e6, 0.01), LinkEstimate(1e9, 0.001)),
          replicas: tuple[int, ...] | None = None, costs: RuntimeCosts = RuntimeCosts()) -> Topology:
    names = ["edge", *(f"cloud{i}" for i in range(1, len(slowdowns)))]
    replicas = replicas or (1,) * len(slowdowns)
    tiers = tuple(Tier(i, tuple(name if r == 1 else f"{name}{chr(97 + k)}" for k in range(r)), compute_scale=s)
                  for i, (name, s, r) in enumerate(zip(names, slowdowns, replicas)))
    return Topology(tiers, links[:len(slowdowns) - 1], costs)


#: A cluster file of three tiers (a slow edge and two workers) for topology and apply_plan tests.
THREE_TIER_CLUSTER = """
nodes:
  - {name: edge, role: edge, slowdown: 8}
  - {name: cloud1, address: 127.0.0.1:50061}
  - {name: cloud2, address: 127.0.0.1:50062}
links:
  - {from: edge, to: cloud1, bandwidth: 20Mbit, latency: 10ms, jitter: 1ms, codec: int8+zstd}
  - {from: cloud1, to: cloud2, bandwidth: 1Gbit, latency: 1ms, loss: 0.01}
batching: {max_batch: 4, max_wait: 3ms}
"""
