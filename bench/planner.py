"""Benchmark: does the planner choose well? Every candidate split predicted and measured, regret, speed-ups.

Two packages, each served on a local 3-node chain (this process is the edge, slowed 8x; cloud1 and cloud2
are ``splitexit node`` processes started by ``LocalCluster``; links emulated by the runtime):

* **digits**: ``digits_cnn`` trained jointly with its exits on scikit-learn's digits (``--epochs``, default 5,
  a few seconds) and calibrated with ``max_drop=0.01``, so requests leave at every exit; or an existing
  calibrated package (``--digits-package .splitexit-cache/demo/digits_cnn``). The output says which.
* **resnet18**: random weights, synthetic 3x224x224 inputs, exits uncalibrated (they never fire: every
  request runs to the end).

Both are saved with ``cpu.threads: 1`` (this process runs torch on 1 thread too): with three processes on a
small box, more intra-op threads make OpenMP wait for busy cores and profile and serving disagree.
The package is profiled once (``profile_package``, cached in its ``profile.json``); the planner's
``RuntimeCosts`` are left as they are (this bench measures the model, it does not tune it).

**Cluster, per uplink bandwidth** (1, 10, 100, 1000 Mbit/s; the worker processes are restarted for each,
because the nodes emulate the results' way up from the file): edge -> cloud1 at the bandwidth with 10 ms
latency; cloud1 -> cloud2 1 Gbit/s, 1 ms; edge -> cloud2 with the uplink's figures (used when cloud1 is
skipped); ``max_batch`` 1, window 1.

**Candidates.** A split is where the edge's stage ends and where cloud1's ends; cloud2 runs the rest. Both
range over the planner's candidate cuts (``candidate_cuts``; for resnet18 a documented subset, see
``RESNET_CUTS``) plus the input and the output, so a tier may compute nothing: edge-only, cloud-only (the
edge sends the input to cloud2), cloud1 skipped, cloud2 skipped. Exits are fixed to the calibrated ones for
planning (``exit_sets=[calibrated]``) and serving, so the comparison is about the split. Each candidate uses
the planner's own best codec per link for that split: ``predict`` is evaluated for every profiled codec on
one link with the others fixed, link after link, twice over (a link's codec only changes that link's
additive terms, so this finds the minimum ``plan`` would; the planner's own choice is checked against it).

**Prediction** is ``predict(profile, topology, stages, calibrated exits, codecs)`` with the profile's exit
table restricted to exactly the calibration samples this bench sends (the same samples, so the exit mix of
the prediction is the exit mix of the measurement). The planner's choice uses the whole table, as
``splitexit plan`` does.

**Measurement.** Per bandwidth one ``Entry`` (window 1, no re-planning) whose placer serves the candidate
under test via ``placement_from_plan``; switching candidates asks its coordinator to re-plan (it assigns and
ships the stages), then the edge sends warm-up requests that go to the deepest exit, then timed requests,
one at a time. digits: a fixed set of calibration samples chosen so their exit mix matches the whole
calibration split's (largest remainder). resnet18: the calibration samples in order, at least
``min_timed`` and then more until ``budget_s`` seconds are spent or ``max_timed`` are sent. After every
candidate is measured at a bandwidth, the planner's choice, the ``confirm`` best measured ones, edge-only
and cloud-only are measured once more, and their two blocks pooled (this blunts the winner's curse of
taking the minimum over many noisy means). The planner plans over all its candidate cuts; if its choice is
not one of the candidates (outside resnet18's subset, or other codecs), it is measured as an extra row.
Finally every candidate whose prediction is off by more than 20% gets one more block, shown next to the
first as a diagnostic (is it the model or a noisy minute?) and kept out of the check. Every request's
breakdown from the runtime's trace (edge compute, link, remote compute, ...) goes to the JSON.

**Checks.** (1) predicted / measured mean latency for every candidate and bandwidth, and how many lie within
20% (0.8 <= ratio <= 1.2); (2) regret: measured mean of the planner's choice over the best measured
candidate, minus one (aim: <= 10%); (3) measured speed-up of the choice over edge-only and cloud-only.

Absolute times on a shared 2-core box move with whatever else runs; ``slowdown`` multiplies the edge's
measured compute, so CPU contention is stretched 8x there. Run ``.venv/bin/python bench/planner.py``
(about 20 minutes on a 2-core box; ``--quick``: 4 digits cuts, 2 resnet18 cuts, fewer requests, about 3
minutes); ``--json PATH`` keeps every number (and the profiles), ``--markdown PATH`` writes the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import splitexit
from local_nodes import start_local_cluster
from splitexit import EarlyExitNet, build_model
from splitexit.app.plan import calibrated_exits, profile_package
from splitexit.app.train import calibrate_package, train_package
from splitexit.config import ClusterSpec, DataSplit, ModelSource, TrainConfig
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import LocalCluster, free_port
from splitexit.control.replan import placement_from_plan
from splitexit.errors import ClusterError, ConfigError
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.package import read_spec
from splitexit.plan.objective import Objective
from splitexit.plan.prediction import predict
from splitexit.plan.profile import ExitTable, Profile
from splitexit.plan.result import Plan
from splitexit.plan.search import plan
from splitexit.plan.topology import Topology, topology_from_cluster
from splitexit.runtime.records import RequestRecord

SEED = 0
BANDWIDTHS = (1.0, 10.0, 100.0, 1000.0)  # uplink Mbit/s
EDGE_SLOWDOWN = 8
UPLINK_LATENCY = "10ms"
BACKBONE = {"bandwidth": "1Gbit", "latency": "1ms"}
WITHIN = 0.2  # check 1: predicted within 20% of measured
REGRET_AIM = 0.10  # check 2
#: resnet18's subset of candidate cuts: the stem and the end of every residual block (full mode), the end of
#: every stage (quick). The planner itself still plans over all of its candidate cuts; if it picks a split
#: outside the subset, that split is measured too.
RESNET_CUTS = ("maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
               "layer4.1")
RESNET_CUTS_QUICK = ("layer1", "layer3")
#: digits_cnn in quick mode: a few cuts around its exits (full mode: every candidate cut).
DIGITS_CUTS_QUICK = (2, 6, 9, 13)
RESNET_INPUT = (3, 224, 224)


@dataclass(frozen=True)
class Sampling:
    """How many requests measure one candidate."""

    warmup: int  # untimed, sent to the deepest exit so every stage of the chain has run
    min_timed: int
    max_timed: int
    budget_s: float  # after min_timed, keep sending until this much time is spent (or max_timed)


@dataclass(frozen=True)
class Settings:
    digits_cuts: tuple[int, ...] | None  # None: every candidate cut
    resnet_cuts: tuple[str, ...]
    digits: Sampling
    resnet: Sampling
    confirm: int  # best measured candidates measured once more (besides the choice, edge-only, cloud-only)


#: digits: 24 requests per block. With 8, edge-only's block means (the same work every time) ranged 5.9-10.7 ms
#: within one run: a sub-millisecond model stretched 8x by the emulation carries the box's noise 8x.
FULL = Settings(digits_cuts=None, resnet_cuts=RESNET_CUTS, digits=Sampling(1, 24, 24, 0.0),
                resnet=Sampling(1, 1, 3, 0.8), confirm=3)
QUICK = Settings(digits_cuts=DIGITS_CUTS_QUICK, resnet_cuts=RESNET_CUTS_QUICK, digits=Sampling(1, 6, 6, 0.0),
                 resnet=Sampling(1, 1, 2, 0.8), confirm=2)


# ------------------------------------------------------------------------------------------ packages
@dataclass
class Model:
    """A package ready to serve and plan: the net, its profile, the calibrated exits and the inputs to send."""

    name: str
    origin: str  # how the package came about (printed)
    path: Path
    net: EarlyExitNet
    profile: Profile
    exits: tuple[int, ...]
    inputs: list[tuple[int, torch.Tensor]]  # (calibration index, input) in the order they are sent
    warmup: list[tuple[int, torch.Tensor]]
    subset: tuple[int, ...]  # cuts the candidates range over
    sampling: Sampling


def _resave_single_thread(source: Path, target: Path) -> EarlyExitNet:
    """Copy a package with ``cpu.threads: 1`` (memory format kept), metadata intact."""
    spec = read_spec(source)
    net = splitexit.load(source)
    net.cpu = net.cpu.model_copy(update={"threads": 1})
    splitexit.save(net, target, data=spec.data, training=spec.training, calibration=spec.calibration)
    return splitexit.load(target).eval()


def digits_model(workdir: Path, settings: Settings, *, epochs: int, existing: Path | None) -> Model:
    path = workdir / "digits_cnn"
    if existing is not None:
        net = _resave_single_thread(existing, path)
        origin = f"reused {existing} (copied with cpu.threads 1)"
    else:
        trained = workdir / "digits_trained"
        train_package("digits_cnn", "digits", trained, config=TrainConfig(epochs=epochs, seed=SEED))
        calibrate_package(trained, max_drop=0.01)
        net = _resave_single_thread(trained, path)
        origin = f"trained here: digits_cnn, joint, {epochs} epochs, calibrated max_drop 0.01"
    exits = calibrated_exits(net)
    if not exits:
        raise ConfigError(f"{existing or path} has no calibrated exit; run `splitexit calibrate` on it first")
    profile = profile_package(path).profile
    calib = split_dataset(load_dataset("digits"), read_spec(path).data).calib
    leave = profile.exits.route(exits)
    chosen = _stratified(leave, settings.digits.min_timed)
    deepest = [i for i in range(len(leave)) if leave[i] == leave.max() and i not in chosen][:settings.digits.warmup]
    cuts = profile.cuts if settings.digits_cuts is None else settings.digits_cuts
    return Model("digits", origin, path, net, profile, exits, [(i, calib[i][0]) for i in chosen],
                 [(i, calib[i][0]) for i in deepest], tuple(cuts), settings.digits)


def resnet_model(workdir: Path, settings: Settings) -> Model:
    path = workdir / "resnet18"
    torch.manual_seed(SEED)
    net = EarlyExitNet.from_model(build_model("resnet18", 10).eval(), torch.zeros(1, *RESNET_INPUT),
                                  source=ModelSource(name="resnet18", num_classes=10)).eval()
    net.cpu = net.cpu.model_copy(update={"threads": 1})
    dataset = f"synthetic:{'x'.join(map(str, RESNET_INPUT))}:64"
    splitexit.save(net, path, data=DataSplit(dataset=dataset))
    net = splitexit.load(path).eval()
    profile = profile_package(path).profile
    calib = split_dataset(load_dataset(dataset), read_spec(path).data).calib
    inputs = [(i, calib[i][0]) for i in range(len(calib))]
    cuts = tuple(net.graph.resolve(name).id for name in settings.resnet_cuts)
    missing = [c for c in cuts if c not in profile.cuts]
    if missing:
        raise ConfigError(f"resnet18 cuts {missing} are not among the planner's candidate cuts {profile.cuts}")
    return Model("resnet18", "random weights, uncalibrated exits (none fire), synthetic 3x224x224 inputs", path,
                 net, profile, calibrated_exits(net), inputs, inputs[:settings.resnet.warmup], cuts, settings.resnet)


def _stratified(leave: np.ndarray, count: int) -> list[int]:
    """``count`` sample indices whose exit mix matches ``leave``'s (largest remainder), spread over each class."""
    classes = sorted(set(leave.tolist()))
    shares = {j: float(np.mean(leave == j)) * count for j in classes}
    quota = {j: int(math.floor(s)) for j, s in shares.items()}
    for j in sorted(classes, key=lambda j: quota[j] - shares[j])[:count - sum(quota.values())]:
        quota[j] += 1
    picks: list[int] = []
    for j in classes:
        members = np.flatnonzero(leave == j)
        if quota[j]:
            picks += sorted({int(members[k]) for k in np.linspace(0, len(members) - 1, quota[j]).round().astype(int)})
    return sorted(picks)


def _restricted(profile: Profile, samples: Sequence[int]) -> Profile:
    """The profile with its exit table cut down to ``samples`` (repeats allowed): predictions for those inputs."""
    index = np.asarray(samples, dtype=np.int64)
    table = profile.exits
    return replace(profile, exits=ExitTable(key=table.key, confident=table.confident[:, index],
                                            correct=table.correct[:, index]))


# ------------------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Split:
    """Positions (0 = input, k + 1 = after candidate cut k, K + 1 = output) where the edge and cloud1 stop."""

    edge_end: int
    cloud1_end: int

    def stages(self, profile: Profile) -> list[tuple[int, int | None, int | None]]:
        K = len(profile.cuts)
        cut = lambda p: None if p in (0, K + 1) else profile.cuts[p - 1]  # noqa: E731
        stages = []
        if self.edge_end > 0:
            stages.append((0, None, cut(self.edge_end)))
        if self.cloud1_end > self.edge_end:
            stages.append((1, cut(self.edge_end), cut(self.cloud1_end)))
        if self.cloud1_end < K + 1:
            stages.append((2, cut(self.cloud1_end), None))
        return stages

    def label(self, profile: Profile) -> str:
        names = ("edge", "cloud1", "cloud2")
        show = lambda c, end: ("out" if end else "in") if c is None else str(c)  # noqa: E731
        return " → ".join(f"{names[t]}[{show(a, False)}..{show(b, True)}]" for t, a, b in self.stages(profile))

    @classmethod
    def of(cls, chosen: Plan, profile: Profile) -> Split:
        K = len(profile.cuts)
        position = {None: K + 1, **{c: i + 1 for i, c in enumerate(profile.cuts)}}
        ends = {s.tier: position[s.end] for s in chosen.stages}
        edge = ends.get(0, 0)
        return cls(edge, ends.get(1, edge))


def splits(profile: Profile, cuts: Sequence[int]) -> list[Split]:
    K = len(profile.cuts)
    positions = [0, *sorted(profile.cuts.index(c) + 1 for c in cuts), K + 1]
    return [Split(e, c) for i, e in enumerate(positions) for c in positions[i:]]


def best_codecs(profile: Profile, topology: Topology, stages: Sequence[tuple[int, int | None, int | None]],
                exits: Sequence[int]) -> tuple[str, ...]:
    """Per link, the profiled codec with the least predicted latency (link after link, two passes)."""
    codecs = list(profile.timing.transfers[0].codecs)
    links = sum(1 for tier, _, _ in stages if tier != 0)
    chosen = ["raw"] * links
    for _ in range(2 if links > 1 else 1):
        for link in range(links):
            chosen[link] = min(codecs, key=lambda c: predict(profile, topology, stages, exits,
                                                             [*chosen[:link], c, *chosen[link + 1:]]).latency_ms)
    return tuple(chosen)


@dataclass
class Block:
    """Requests sent for one candidate in one go (after switching to it and warming up)."""

    latencies: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)  # calibration index of every timed request
    breakdowns: list[dict[str, float]] = field(default_factory=list)  # the runtime's split of each latency
    errors: int = 0
    exit_mismatches: int = 0  # requests answered at another exit than the profile's table says


@dataclass(eq=False)  # rows are compared (and kept in sets) by identity
class Row:
    """One candidate at one bandwidth: what it is, what was predicted, what was measured."""

    split: Split
    label: str
    codecs: tuple[str, ...]
    plan: Plan  # predict() on the whole profile (what the runtime is given)
    blocks: list[Block] = field(default_factory=list)  # the sweep's block, and the confirmation's if any
    predicted_ms: float = math.nan  # for exactly the samples sent in ``blocks``
    recheck: Block | None = None  # a diagnostic block for rows off by more than 20% (not in the check)
    recheck_predicted_ms: float = math.nan
    extra: bool = False  # the planner's choice, outside the measured subset

    @property
    def latencies(self) -> list[float]:
        return [x for block in self.blocks for x in block.latencies]

    @property
    def samples(self) -> list[int]:
        return [x for block in self.blocks for x in block.samples]

    def part_ms(self, part: str) -> float:
        """Mean of one part of the runtime's latency breakdown (e.g. ``edge_compute``) over the timed requests."""
        values = [b.get(part, 0.0) for block in self.blocks for b in block.breakdowns]
        return statistics.fmean(values) if values else math.nan

    @property
    def measured_ms(self) -> float:
        latencies = self.latencies
        return statistics.fmean(latencies) if latencies else math.nan

    @property
    def ratio(self) -> float:
        return self.predicted_ms / self.measured_ms if self.blocks else math.nan

    @property
    def recheck_ratio(self) -> float:
        return self.recheck_predicted_ms / statistics.fmean(self.recheck.latencies) \
            if self.recheck and self.recheck.latencies else math.nan


# ------------------------------------------------------------------------------------------ measuring
def cluster_dict(bandwidth_mbit: float) -> dict:
    uplink = {"bandwidth": f"{bandwidth_mbit:g}Mbit", "latency": UPLINK_LATENCY}
    return {"nodes": [{"name": "edge", "role": "edge", "slowdown": EDGE_SLOWDOWN},
                      {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                      {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
            "links": [{"from": "edge", "to": "cloud1", **uplink}, {"from": "cloud1", "to": "cloud2", **BACKBONE},
                      {"from": "edge", "to": "cloud2", **uplink}],
            "batching": {"max_batch": 1, "max_wait": "1ms"}, "window": 1}


def start_cluster(workdir: Path, bandwidth_mbit: float) -> tuple[LocalCluster, ClusterSpec]:
    """The worker processes for one bandwidth."""
    def write() -> tuple[Path, ClusterSpec]:
        path = workdir / f"cluster-{bandwidth_mbit:g}mbit.yaml"
        path.write_text(yaml.safe_dump(cluster_dict(bandwidth_mbit), sort_keys=False))
        return path, load_cluster(path)

    local, cluster, _ = start_local_cluster(write, workdir)
    return local, cluster


class _Serve:
    """The entry's placer: whatever plan is under test."""

    def __init__(self, net: EarlyExitNet, chosen: Plan):
        self.net, self.plan = net, chosen

    def __call__(self, cluster: ClusterSpec, live: set[str]):  # noqa: ANN204 - a runtime Placement
        return placement_from_plan(self.net, cluster, self.plan)


async def _switch(entry: Entry, placer: _Serve, cluster: ClusterSpec, row: Row) -> None:
    want = placement_from_plan(placer.net, cluster, row.plan).version
    if entry.placement.version == want:
        return
    placer.plan = row.plan
    entry.coordinator.request_replan(f"bench: {row.label}")  # type: ignore[union-attr]
    deadline = time.monotonic() + 60
    while entry.placement.version != want:
        if time.monotonic() > deadline:
            raise ClusterError(f"the coordinator did not switch to {row.label} within 60 s")
        await asyncio.sleep(0.005)


async def _measure(entry: Entry, placer: _Serve, cluster: ClusterSpec, model: Model, row: Row) -> Block:
    """One block of requests for ``row``: switch, warm up, then timed requests one at a time."""
    await _switch(entry, placer, cluster, row)
    for index, x in model.warmup:
        await entry.infer(x, index=index)
    expected = model.profile.exits.route(model.exits)
    sampling = model.sampling
    block = Block()
    started = time.perf_counter()
    sent = 0
    more = lambda: sent < sampling.min_timed or time.perf_counter() - started < sampling.budget_s  # noqa: E731
    while sent < sampling.max_timed and more():
        index, x = model.inputs[sent % len(model.inputs)]
        record: RequestRecord = await entry.infer(x, index=index)
        sent += 1
        if record.error:
            block.errors += 1
            logging.getLogger(__name__).warning("%s: %s", row.label, record.error)
            continue
        block.latencies.append(record.latency_ms)
        block.samples.append(index)
        block.breakdowns.append(record.breakdown_ms)
        block.exit_mismatches += int(record.exit != expected[index])
    return block


def _predicted(model: Model, topology: Topology, row: Row, samples: Sequence[int]) -> float:
    """The candidate's predicted mean latency over exactly ``samples``."""
    return predict(_restricted(model.profile, samples), topology, row.split.stages(model.profile), model.exits,
                   row.codecs).latency_ms


async def _sweep(model: Model, cluster: ClusterSpec, topology: Topology, rows: list[Row], must: Sequence[Row],
                 confirm: int) -> None:
    """Through one entry: every row; then ``must`` and the ``confirm`` best measured rows once more; then a
    diagnostic block for every row whose prediction is off by more than 20%."""
    placer = _Serve(model.net, rows[0].plan)
    entry = Entry(model.net, cluster, window=1, placer=placer, replan=False)
    await entry.start()
    try:
        for row in rows:
            row.blocks.append(await _measure(entry, placer, cluster, model, row))
        ranked = sorted((r for r in rows if r.latencies), key=lambda r: r.measured_ms)
        for row in dict.fromkeys([*must[:1], *ranked[:confirm], *must[1:]]):
            row.blocks.append(await _measure(entry, placer, cluster, model, row))
        for row in rows:
            row.predicted_ms = _predicted(model, topology, row, row.samples) if row.samples else math.nan
        for row in [r for r in rows if abs(r.ratio - 1) > WITHIN]:
            row.recheck = await _measure(entry, placer, cluster, model, row)
            if row.recheck.samples:
                row.recheck_predicted_ms = _predicted(model, topology, row, row.recheck.samples)
    finally:
        await entry.close()


@dataclass
class BandwidthResult:
    bandwidth_mbit: float
    rows: list[Row]
    chosen: Row
    chosen_plan: Plan  # plan()'s own best (whole profile)
    chosen_matches_candidate: bool  # plan()'s codecs equal the per-link best found for its split
    best: Row
    edge_only: Row
    cloud_only: Row
    seconds: float
    load: float  # 1-minute load average when this bandwidth was done

    @property
    def regret(self) -> float:
        return self.chosen.measured_ms / self.best.measured_ms - 1


async def run_bandwidth(model: Model, bandwidth: float, workdir: Path, settings: Settings) -> BandwidthResult:
    """Every candidate at one uplink bandwidth, on freshly started worker processes."""
    started = time.perf_counter()
    local, cluster = start_cluster(workdir, bandwidth)
    try:
        topology = topology_from_cluster(cluster)
        profile = model.profile
        rows = []
        for split in splits(profile, model.subset):
            stages = split.stages(profile)
            codecs = best_codecs(profile, topology, stages, model.exits)
            rows.append(Row(split, split.label(profile), codecs,
                            predict(profile, topology, stages, model.exits, codecs, label=split.label(profile))))
        result = plan(profile, topology, Objective("latency"), exit_sets=[model.exits])
        chosen_plan = result.best
        chosen_split = Split.of(chosen_plan, profile)
        chosen_codecs = tuple(link.codec for link in chosen_plan.links)
        chosen = next((r for r in rows if r.split == chosen_split and r.codecs == chosen_codecs), None)
        matches = chosen is not None
        if chosen is None:  # outside the subset, or the DP chose other codecs than the per-link search: measure it too
            chosen = Row(chosen_split, chosen_split.label(profile), chosen_codecs, chosen_plan, extra=True)
            rows.append(chosen)
        K = len(profile.cuts)
        edge_only = next(r for r in rows if r.split == Split(K + 1, K + 1))
        cloud_only = next(r for r in rows if r.split == Split(0, 0))
        await _sweep(model, cluster, topology, rows, [chosen, edge_only, cloud_only], settings.confirm)
    finally:
        local.stop()
    best = min((r for r in rows if r.latencies), key=lambda r: r.measured_ms)
    return BandwidthResult(bandwidth, rows, chosen, chosen_plan, matches, best, edge_only, cloud_only,
                           time.perf_counter() - started, os.getloadavg()[0])


# ------------------------------------------------------------------------------------------ report
def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def candidate_table(model: Model, results: list[BandwidthResult]) -> tuple[list[str], list[list[str]]]:
    header = ["split"]
    for r in results:
        header += [f"{r.bandwidth_mbit:g} Mbit/s codecs", "pred ms", "meas ms", "pred/meas"]

    def cells(r: BandwidthResult, row: Row | None) -> list[str]:
        if row is None:
            return ["", "", "", ""]
        mark = " *" if row is r.chosen else ""
        return [", ".join(row.codecs) or "–", _ms(row.predicted_ms), _ms(row.measured_ms) + mark,
                f"{row.ratio:.2f}" + ("" if abs(row.ratio - 1) <= WITHIN else " ✗")]

    def candidate(r: BandwidthResult, split: Split) -> Row | None:
        return next((x for x in r.rows if x.split == split and not x.extra), None)

    body = []
    for split in (row.split for row in results[0].rows if not row.extra):
        body.append([split.label(model.profile), *(c for r in results for c in cells(r, candidate(r, split)))])
    for r in results:  # the planner's choice when it is not one of the candidates above
        for row in (x for x in r.rows if x.extra):
            body.append([f"{row.label} (planner's choice at {r.bandwidth_mbit:g} Mbit/s)",
                         *(c for other in results for c in cells(other, row if other is r else None))])
    return header, body


def agreement(results: list[BandwidthResult]) -> tuple[int, int, float, float]:
    ratios = [row.ratio for r in results for row in r.rows if row.latencies]
    inside = sum(1 for x in ratios if abs(x - 1) <= WITHIN)
    return inside, len(ratios), min(ratios), max(ratios)


def regret_table(results: list[BandwidthResult]) -> tuple[list[str], list[list[str]]]:
    header = ["uplink", "planner's choice (codecs)", "pred ms", "meas ms", "measured best (codecs)", "meas ms",
              "regret", "≤ 10%"]
    body = []
    for r in results:
        c, b = r.chosen, r.best
        body.append([f"{r.bandwidth_mbit:g} Mbit/s", f"{c.label} ({', '.join(c.codecs) or '–'})",
                     _ms(r.chosen_plan.latency_ms), _ms(c.measured_ms),
                     "the same" if b is c else f"{b.label} ({', '.join(b.codecs) or '–'})", _ms(b.measured_ms),
                     f"{100 * r.regret:.1f}%", "yes" if r.regret <= REGRET_AIM else "no"])
    return header, body


def speedup_table(results: list[BandwidthResult]) -> tuple[list[str], list[list[str]]]:
    header = ["uplink", "choice meas ms", "edge-only meas ms", "speed-up vs edge-only", "cloud-only (codec)",
              "cloud-only meas ms", "speed-up vs cloud-only"]
    body = []
    for r in results:
        c = r.chosen.measured_ms
        body.append([f"{r.bandwidth_mbit:g} Mbit/s", _ms(c), _ms(r.edge_only.measured_ms),
                     f"{r.edge_only.measured_ms / c:.2f}x", ", ".join(r.cloud_only.codecs),
                     _ms(r.cloud_only.measured_ms), f"{r.cloud_only.measured_ms / c:.2f}x"])
    return header, body


def _print(console: Console, title: str, header: list[str], body: list[list[str]]) -> None:
    table = Table(title=title, show_lines=False)
    for column in header:
        table.add_column(column, justify="left" if column in ("split", "uplink") else "right", overflow="fold")
    for line in body:
        table.add_row(*(escape(cell) for cell in line))
    console.print(table)


def _markdown(title: str, header: list[str], body: list[list[str]]) -> str:
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def row_json(row: Row) -> dict:
    block = lambda b: {"latencies_ms": b.latencies, "samples": b.samples, "breakdowns_ms": b.breakdowns,  # noqa: E731
                       "errors": b.errors, "exit_mismatches": b.exit_mismatches}
    return {"split": [row.split.edge_end, row.split.cloud1_end], "label": row.label, "codecs": list(row.codecs),
            "predicted_ms": row.predicted_ms, "predicted_whole_profile_ms": row.plan.latency_ms,
            "measured_ms": row.measured_ms, "ratio": row.ratio, "blocks": [block(b) for b in row.blocks],
            "recheck": block(row.recheck) if row.recheck else None, "recheck_predicted_ms": row.recheck_predicted_ms,
            "recheck_ratio": row.recheck_ratio, "extra": row.extra}


def recheck_table(results: list[BandwidthResult]) -> tuple[list[str], list[list[str]]]:
    header = ["uplink", "split (codecs)", "pred ms", "meas ms", "pred/meas", "again: meas ms", "again: pred/meas"]
    body = []
    for r in results:
        for row in (x for x in r.rows if x.recheck is not None):
            again = statistics.fmean(row.recheck.latencies) if row.recheck.latencies else math.nan
            body.append([f"{r.bandwidth_mbit:g} Mbit/s", f"{row.label} ({', '.join(row.codecs) or '–'})",
                         _ms(row.predicted_ms), _ms(row.measured_ms), f"{row.ratio:.2f}", _ms(again),
                         f"{row.recheck_ratio:.2f}"])
    return header, body


def model_line(model: Model, seconds: float) -> str:
    profile = model.profile
    rates = [round(r, 3) for r in profile.exits.exit_rates(model.exits)]
    sent = [round(r, 3) for r in _restricted(profile, [i for i, _ in model.inputs]).exits.exit_rates(model.exits)]
    return (f"candidate cuts {list(profile.cuts)}; candidates range over {list(model.subset)} -> "
            f"{len(splits(profile, model.subset))} splits; calibrated exits {list(model.exits)} at cuts "
            f"{[profile.exit_cuts[j] for j in model.exits]}; exit rates (calibration split) {rates}, of the "
            f"{len(model.inputs)} inputs sent {sent}; profiled idle factors "
            f"{ {k: round(v, 2) for k, v in profile.timing.idle_factors.items()} }; "
            f"package + profile in {seconds:.0f} s")


def progress_line(name: str, r: BandwidthResult) -> str:
    inside, total, low, high = agreement([r])
    errors = sum(b.errors for row in r.rows for b in row.blocks)
    mismatches = sum(b.exit_mismatches for row in r.rows for b in row.blocks)
    requests = sum(len(b.latencies) for row in r.rows for b in row.blocks)
    note = "" if r.chosen_matches_candidate else " (measured as an extra row: not among the candidates as searched)"
    edge = r.edge_only
    return (f"{name} @ {r.bandwidth_mbit:g} Mbit/s: {len(r.rows)} candidates, {requests} timed requests in "
            f"{r.seconds:.0f} s (load average {r.load:.2f}); within 20%: {inside}/{total} "
            f"(ratios {low:.2f}-{high:.2f}); "
            f"chosen {r.chosen.label} ({', '.join(r.chosen.codecs) or '–'}){note}, regret {100 * r.regret:.1f}%; "
            f"errors {errors}, answered at another exit than profiled {mismatches}; edge-only predicted "
            f"{edge.predicted_ms:.1f} ms, measured {edge.measured_ms:.1f} ms of which edge compute (slowdown "
            f"included) {edge.part_ms('edge_compute'):.1f} ms")


def report_model(console: Console, model: Model, results: list[BandwidthResult]) -> tuple[str, dict]:
    """Print the three tables (and the re-measured misses); the same as markdown, and the numbers as JSON."""
    name = model.name
    tables = [(f"{name}: every candidate, predicted vs measured mean latency (* = the planner's choice, ✗ = off by "
               f"more than 20%)", *candidate_table(model, results))]
    inside, total, low, high = agreement(results)
    summary = f"{name}: {inside} of {total} (candidate, bandwidth) pairs within 20% (ratios {low:.2f}-{high:.2f})"
    tables += [(f"{name}: the planner's choice against the best measured candidate", *regret_table(results)),
               (f"{name}: measured speed-up of the planner's choice", *speedup_table(results))]
    header, body = recheck_table(results)
    if body:
        tables.append((f"{name}: the pairs off by more than 20%, measured once more afterwards (diagnostic only: "
                       f"not pooled into the check)", header, body))
    parts = [f"### {name}\n\n{model.origin}\n"]
    for i, (title, header, body) in enumerate(tables):
        _print(console, title, header, body)
        parts.append(_markdown(title, header, body))
        if i == 0:
            console.print(summary, highlight=False)
            parts.append(summary + "\n")
    rates = model.profile.exits.exit_rates(model.exits)
    numbers = {
        "origin": model.origin, "cuts": list(model.profile.cuts), "subset": list(model.subset),
        "exits": list(model.exits), "exit_rates": list(rates),
        "idle_factors": {str(k): v for k, v in model.profile.timing.idle_factors.items()},
        "profile": model.profile.to_json(),  # what the planner was given (segments, codecs, idle factors, exits)
        "sent_exit_rates": list(_restricted(model.profile, [i for i, _ in model.inputs]).exits.exit_rates(model.exits)),
        "within_20pct": inside, "pairs": total,
        "bandwidths": [{"bandwidth_mbit": r.bandwidth_mbit, "seconds": r.seconds, "load_average": r.load,
                        "chosen": row_json(r.chosen), "chosen_plan": r.chosen_plan.to_dict(),
                        "chosen_matches_candidate": r.chosen_matches_candidate, "best": row_json(r.best),
                        "regret": r.regret, "speedup_vs_edge_only": r.edge_only.measured_ms / r.chosen.measured_ms,
                        "speedup_vs_cloud_only": r.cloud_only.measured_ms / r.chosen.measured_ms,
                        "rows": [row_json(x) for x in r.rows]} for r in results]}
    return "\n".join(parts), numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer candidates and requests (a few minutes)")
    parser.add_argument("--models", default="digits,resnet18", help="comma-separated: digits, resnet18")
    parser.add_argument("--bandwidths", default=",".join(f"{b:g}" for b in BANDWIDTHS), help="uplink Mbit/s")
    parser.add_argument("--epochs", type=int, default=5, help="digits_cnn training epochs")
    parser.add_argument("--digits-package", type=Path, help="a calibrated digits package to use instead of "
                                                            "training one (e.g. .splitexit-cache/demo/digits_cnn)")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--markdown", type=Path, help="write the tables here as markdown")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    bandwidths = [float(b) for b in args.bandwidths.split(",")]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=250)
    started = time.perf_counter()
    load = os.getloadavg()
    console.print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, torch "
                  f"threads 1, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
                  f"{'quick' if args.quick else 'full'} settings {settings}")
    report: dict = {"settings": {"quick": args.quick, "bandwidths_mbit": bandwidths, "edge_slowdown": EDGE_SLOWDOWN,
                                 "uplink_latency": UPLINK_LATENCY, "backbone": BACKBONE},
                    "load_average_start": load, "models": {}}
    markdown: list[str] = []
    loop = asyncio.new_event_loop()  # one loop for the whole run: grpc.aio's poller outlives a closed loop
    try:
        with tempfile.TemporaryDirectory(prefix="splitexit-bench-planner-") as tmp:
            workdir = Path(tmp)
            for name in args.models.split(","):
                t0 = time.perf_counter()
                model = digits_model(workdir, settings, epochs=args.epochs, existing=args.digits_package) \
                    if name == "digits" else resnet_model(workdir, settings)
                console.rule(f"{name}: {model.origin}")
                console.print(model_line(model, time.perf_counter() - t0), highlight=False)
                results = []
                for bandwidth in bandwidths:
                    results.append(loop.run_until_complete(run_bandwidth(model, bandwidth, workdir, settings)))
                    console.print(escape(progress_line(name, results[-1])), highlight=False)
                text, report["models"][name] = report_model(console, model, results)
                markdown.append(text)
    finally:
        loop.close()
    total_s = time.perf_counter() - started
    load = os.getloadavg()
    report["load_average_end"], report["seconds"] = load, total_s
    console.print(f"total {total_s:.0f} s; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text("\n".join(markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
