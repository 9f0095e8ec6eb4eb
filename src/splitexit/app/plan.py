"""The planning commands end to end (profile, plan), one function each, for the thin CLI."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import yaml

from splitexit.config import ClusterSpec, DataSplit
from splitexit.config.load import load_cluster
from splitexit.control.cluster_profile import profile_cluster, stored_link_estimates
from splitexit.errors import (
    ConfigError,
    CutError,
    DataError,
    PackageError,
)
from splitexit.model.cpu import apply_threads
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.exits import EarlyExitNet
from splitexit.model.package import load, read_spec
from splitexit.plan.planner import (
    LinkEstimate,
    Objective,
    Plan,
    PlanResult,
    Topology,
    apply_plan,
    plan,
    predict,
    topology_from_cluster,
)
from splitexit.plan.profile import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_CODECS,
    DEFAULT_REPEATS,
    PROFILE_FILE,
    Profile,
    calibration_inputs,
    candidate_cuts,
    exits_key,
    load_profile,
    measure_exits,
    measure_timing,
    save_profile,
    timing_key,
)

__all__ = ["PlanSummary", "ProfileSummary", "SweepPoint", "calibrated_exits", "plan_package", "profile_package",
           "sweep_bandwidth", "write_plan"]

logger = logging.getLogger(__name__)

#: Calibration inputs whose activations feed segment timing (batches are cut from them, cycling if fewer).
TIMING_INPUTS = 16
#: Uplink bandwidths of the sweep: 1 Mbit/s to 1 Gbit/s, log-spaced.
SWEEP_POINTS = 31

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProfileSummary:
    path: Path
    profile: Profile
    reused_timing: bool
    reused_exits: bool
    topology: Topology | None  # when a cluster file was given: its tiers (slowdowns) and links
    measured_now: tuple[str, ...] = ()  # nodes and links of the cluster measured in this call (the rest reused)


@dataclass(frozen=True)
class PlanSummary:
    result: PlanResult
    profile: ProfileSummary
    topology: Topology
    cluster: ClusterSpec
    configured: Plan | None  # the prediction for the cluster file's own `ends_at` layout, when it sets one


@dataclass(frozen=True)
class SweepPoint:
    bandwidth: float  # bits per second on the uplink
    best: Plan
    edge_only: Plan
    cloud_only: Plan


def profile_package(package: Path, *, cluster_file: Path | None = None, data: str | None = None,
                    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, codecs: Sequence[str] = DEFAULT_CODECS,
                    repeats: int = DEFAULT_REPEATS, force: bool = False,
                    progress: Progress | None = None) -> ProfileSummary:
    """Measure (or reuse) ``profile.json`` in the package directory; see :mod:`splitexit.plan.profile`.

    Each part is measured again only when its key changed (or with ``force``); the package's thread count
    is applied first, as serving does. With a cluster file, the cluster's running workers are profiled too,
    and its links probed (see :mod:`splitexit.plan.cluster_profile`).
    """
    summary, net = _profile(package, data=data, batch_sizes=batch_sizes, codecs=codecs, repeats=repeats,
                            force=force, progress=progress)
    if cluster_file is None:
        return summary
    cluster = load_cluster(cluster_file)
    if progress is not None:
        progress("the cluster's nodes and links", 0, 1)
    measured = asyncio.run(profile_cluster(net, summary.profile, cluster, force=force))
    profile = replace(summary.profile, nodes=measured.nodes, links=measured.links)
    if measured.measured:
        save_profile(profile, summary.path)
    topology = topology_from_cluster(cluster, measured_links=stored_link_estimates(profile, cluster))
    return replace(summary, profile=profile, topology=topology, measured_now=measured.measured)


def _profile(package: Path, *, data: str | None, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
             codecs: Sequence[str] = DEFAULT_CODECS, repeats: int = DEFAULT_REPEATS, force: bool,
             progress: Progress | None) -> tuple[ProfileSummary, EarlyExitNet]:
    spec = read_spec(package)
    net = load(package)
    apply_threads(net.cpu)
    name = data or (spec.data.dataset if spec.data else None)
    if name is None:
        raise DataError(f"{package} records no dataset; pass --data (profiling needs real calibration inputs)")
    dataset = load_dataset(name)
    if dataset.sample_shape != tuple(net.input_shape):
        raise DataError(f"dataset {name!r} gives samples of shape {dataset.sample_shape}, but {package} expects "
                        f"{tuple(net.input_shape)}; pass the dataset the package was trained on")
    split = DataSplit(dataset=name, seed=spec.data.seed, fractions=spec.data.fractions) if spec.data \
        else DataSplit(dataset=name)
    calib = split_dataset(dataset, split).calib
    cuts = candidate_cuts(net)
    path = package / PROFILE_FILE
    existing = None
    if path.is_file() and not force:
        try:
            existing = load_profile(path)
        except PackageError as exc:
            logger.warning("%s; measuring again", exc)
    sizes = tuple(sorted(set(batch_sizes)))
    codec_names = tuple(codecs)
    want_timing = timing_key(net, cuts, batch_sizes=sizes, codecs=codec_names, repeats=repeats)
    want_exits = exits_key(net, split)
    reuse_timing = existing is not None and dict(existing.timing.key) == want_timing
    reuse_exits = existing is not None and dict(existing.exits.key) == want_exits
    timing = existing.timing if reuse_timing else measure_timing(  # type: ignore[union-attr]
        net, calibration_inputs(calib, TIMING_INPUTS), cuts, batch_sizes=sizes, codecs=codec_names,
        repeats=repeats, progress=progress)
    exits = existing.exits if reuse_exits else measure_exits(net, calib, want_exits)  # type: ignore[union-attr]
    nodes = {k: replace(v, transfers=timing.transfers) for k, v in existing.nodes.items()  # bytes are this machine's
             if v.key.get("weights_sha256") == net.weights_sha256} if existing is not None else {}
    profile = Profile(model=spec.model.name, cuts=cuts, exit_cuts=tuple(c.id for c in net.exit_cuts),
                      num_classes=net.num_classes, timing=timing, exits=exits, nodes=nodes,
                      links=existing.links if existing is not None else {})
    if not (reuse_timing and reuse_exits):
        save_profile(profile, path)
    return ProfileSummary(path, profile, reuse_timing, reuse_exits, None), net


def calibrated_exits(net: EarlyExitNet) -> tuple[int, ...]:
    """The early exits today's runtime evaluates: those with a finite threshold."""
    return tuple(i for i, t in enumerate(net.policy.thresholds) if math.isfinite(t))


def plan_package(package: Path, cluster_file: Path, *, objective: Objective = Objective(), top: int = 5,
                 codecs: Sequence[str] | None = None, keep_exits: bool = False, edge_may_skip: bool = True,
                 data: str | None = None, force_profile: bool = False,
                 measured_links: Mapping[tuple[str, str], LinkEstimate] | None = None,
                 progress: Progress | None = None) -> PlanSummary:
    """Profile (or reuse the profile), then plan ``package`` on the cluster file's chain.

    ``keep_exits`` keeps every calibrated exit active (what today's runtime serves) instead of choosing.
    ``measured_links`` is where link figures measured by the runtime plug in (see
    :func:`~splitexit.plan.planner.topology_from_cluster`); without it, the links ``splitexit profile
    --cluster`` measured (while they still match the file), else the file's figures.
    """
    cluster = load_cluster(cluster_file)
    summary, net = _profile(package, data=data, force=force_profile, progress=progress)
    if measured_links is None:
        measured_links = stored_link_estimates(summary.profile, cluster)
    topology = topology_from_cluster(cluster, measured_links=measured_links)
    exit_sets = [calibrated_exits(net)] if keep_exits else None
    result = plan(summary.profile, topology, objective, codecs=codecs, exit_sets=exit_sets,
                  edge_may_skip=edge_may_skip, top=top)
    configured = _configured(summary.profile, topology, cluster, objective, net)
    return PlanSummary(result, replace(summary, topology=topology), topology, cluster, configured)


def _configured(profile: Profile, topology: Topology, cluster: ClusterSpec, objective: Objective,
                net: EarlyExitNet) -> Plan | None:
    """The prediction for the layout the cluster file sets itself (``ends_at`` on every tier but the last)."""
    tiers = [members for _, members in sorted(cluster.tiers().items())]
    ends = [next((n.ends_at for n in members if n.ends_at is not None), None) for members in tiers[:-1]]
    if any(e is None for e in ends):
        return None
    try:
        cuts: list[int | None] = [None if e == "input" else net.graph.resolve(e).id for e in ends]  # type: ignore[arg-type]
        bounds = [None, *cuts, None]
        stages = [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if not (i == 0 and b is None)]
        codecs = [cluster.link(a[0].name, b[0].name).codec for a, b in zip(tiers, tiers[1:])]
        codecs = ["raw" if c == "auto" else c for c in codecs]
        return predict(profile, topology, stages, calibrated_exits(net), codecs, objective=objective,
                       label="as configured")
    except (ConfigError, CutError) as exc:
        logger.info("cannot predict the cluster file's own layout: %s", exc)
        return None


def write_plan(cluster_file: Path, cluster: ClusterSpec, chosen: Plan, out: Path, package: Path) -> Path:
    """Write the cluster file that serves ``chosen`` (see :func:`~splitexit.plan.planner.apply_plan`)."""
    planned = apply_plan(cluster, chosen)
    data = planned.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=False)
    data["package"] = str(package.resolve())
    exits = ", ".join(map(str, chosen.active_exits)) or "none"
    header = (f"# written by `splitexit plan` from {cluster_file} ({chosen.objective}): {chosen.describe()}\n"
              f"# predicted {chosen.latency_ms:.2f} ms, {chosen.throughput_per_s:.1f}/s; "
              f"active early exits: {exits} (not yet applied by the runtime)\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out


def sweep_bandwidth(profile: Profile, topology: Topology, objective: Objective, out: Path, *,
                    codecs: Sequence[str] | None = None, edge_may_skip: bool = True,
                    points: int = SWEEP_POINTS) -> tuple[Path, list[SweepPoint]]:
    """Plan at uplink bandwidths from 1 Mbit/s to 1 Gbit/s and plot the objective's metric of the best plan
    and both baselines against bandwidth (PNG)."""
    if len(topology.tiers) < 2:
        raise ConfigError("sweeping the uplink needs a cluster with at least one worker after the edge")
    sweep = []
    for bandwidth in np.geomspace(1e6, 1e9, points):
        result = plan(profile, topology.with_bandwidth(float(bandwidth)), objective, codecs=codecs,
                      edge_may_skip=edge_may_skip, top=1)
        sweep.append(SweepPoint(float(bandwidth), result.best, result.edge_only, result.cloud_only))
    _plot_sweep(sweep, objective, topology, out)
    return out, sweep


def _plot_sweep(sweep: list[SweepPoint], objective: Objective, topology: Topology, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = objective.kind == "throughput"
    metric = (lambda p: p.throughput_per_s) if throughput else (lambda p: p.latency_ms)  # noqa: E731
    x = [s.bandwidth / 1e6 for s in sweep]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    ax.plot(x, [metric(s.edge_only) for s in sweep], "--", color="tab:orange", label="edge only")
    ax.plot(x, [metric(s.cloud_only) for s in sweep], "--", color="tab:blue",
            label=f"cloud only (input to {topology.tiers[-1].name})")
    ax.plot(x, [metric(s.best) for s in sweep], "-o", color="tab:green", markersize=3, label="best plan")
    previous = None
    for s in sweep:
        text = s.best.describe()
        if text != previous:
            ax.annotate(text.replace(" → ", "\n→ "), (s.bandwidth / 1e6, metric(s.best)), fontsize=6,
                        xytext=(4, 10), textcoords="offset points", color="tab:green")
            previous = text
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"uplink bandwidth {topology.tiers[0].name} → {topology.tiers[1].name} (Mbit/s)")
    ax.set_ylabel("predicted throughput (inputs/s)" if throughput else "predicted mean latency (ms)")
    ax.set_title(f"splitexit plan: {objective.kind} vs uplink bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
