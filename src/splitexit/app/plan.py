"""The planning commands end to end (profile, plan), one function each, for the thin CLI."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from splitexit.app.package_data import package_dataset
from splitexit.config import ClusterSpec
from splitexit.config.load import load_cluster
from splitexit.control.cluster_profile import profile_cluster, stored_link_estimates
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut
from splitexit.errors import ConfigError, CutError, PackageError
from splitexit.model.cpu import apply_threads
from splitexit.model.data import split_dataset
from splitexit.model.exits import EarlyExitNet
from splitexit.model.package import load, read_spec
from splitexit.plan.candidates import candidate_cuts
from splitexit.plan.measure import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_CODECS,
    DEFAULT_REPEATS,
    calibration_inputs,
    measure_exits,
    measure_timing,
)
from splitexit.plan.objective import Objective
from splitexit.plan.prediction import predict
from splitexit.plan.profile import PROFILE_FILE, Profile, load_profile, save_profile
from splitexit.plan.profile_keys import exits_key, timing_key
from splitexit.plan.result import Plan, PlanResult, apply_plan
from splitexit.plan.search import DEFAULT_TOP, plan
from splitexit.plan.topology import LinkEstimate, Topology, topology_from_cluster
from splitexit.units import parse_duration

__all__ = ["DEFAULT_OBJECTIVE", "PlanSummary", "ProfileSummary", "SweepPoint", "calibrated_exits",
           "objective_from", "plan_package", "profile_package", "sweep_bandwidth", "write_plan"]

logger = logging.getLogger(__name__)

#: Calibration inputs whose activations feed segment timing (batches are cut from them, cycling if fewer).
TIMING_INPUTS = 16
#: Uplink bandwidths of the sweep: SWEEP_POINTS log-spaced from SWEEP_FROM to SWEEP_TO bits per second.
SWEEP_POINTS = 31
SWEEP_FROM, SWEEP_TO = 1e6, 1e9
#: What `plan` and `run` optimise unless told otherwise (deadline when only a deadline is given).
DEFAULT_OBJECTIVE = Objective()
#: Ranked candidates `plan` returns besides the two baselines.

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
class SweepPoint:
    bandwidth: float  # bits per second on the uplink
    best: Plan
    edge_only: Plan
    cloud_only: Plan


@dataclass(frozen=True)
class PlanSummary:
    result: PlanResult
    profile: ProfileSummary
    topology: Topology
    cluster: ClusterSpec
    configured: Plan | None  # the prediction for the cluster file's own `ends_at` layout, when it sets one
    written: Path | None = None  # the cluster file written to serve the best plan, when asked
    sweep: tuple[SweepPoint, ...] = ()  # the best plan and the baselines across uplink bandwidths, when asked


def profile_package(package: Path, *, cluster_file: Path | None = None, data: str | None = None,
                    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, codecs: Sequence[str] | None = None,
                    repeats: int = DEFAULT_REPEATS, force: bool = False,
                    progress: Progress | None = None, trust_models: Sequence[str] = (),
                    edge: str | None = None) -> ProfileSummary:
    """Measure (or reuse) ``profile.json`` in the package directory; see :mod:`splitexit.plan.profile`.

    Each part is measured again only when its key changed (or with ``force``); the package's thread count
    is applied first, as serving does. ``codecs`` defaults to ``DEFAULT_CODECS``. With a cluster file, the
    cluster's running workers are profiled too, and its links probed (see
    :mod:`splitexit.control.cluster_profile`), from ``edge`` (which of the file's edges this is, with several).
    """
    cluster = load_cluster(cluster_file).for_edge(edge) if cluster_file is not None else None
    trusted = (*trust_models, *(cluster.trusted_models if cluster else ()))
    summary, net = _profile(package, data=data, batch_sizes=batch_sizes, codecs=codecs or DEFAULT_CODECS,
                            repeats=repeats, force=force, progress=progress, trust_models=trusted)
    if cluster is None:
        return summary
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
             progress: Progress | None, trust_models: Sequence[str]) -> tuple[ProfileSummary, EarlyExitNet]:
    spec = read_spec(package)
    net = load(package, trust_models=trust_models)
    apply_threads(net.cpu)
    # timing needs real calibration inputs
    dataset, split = package_dataset(package, net, spec.data, data, trust_models)
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
    timing = existing.timing if existing is not None and reuse_timing else measure_timing(
        net, calibration_inputs(calib, TIMING_INPUTS), cuts, batch_sizes=sizes, codecs=codec_names,
        repeats=repeats, progress=progress)
    exits = existing.exits if existing is not None and reuse_exits else measure_exits(net, calib, want_exits)
    nodes = {k: replace(v, transfers=timing.transfers) for k, v in existing.nodes.items()  # bytes are this machine's
             if v.key.get("weights_sha256") == net.weights_sha256} if existing is not None else {}
    profile = Profile(model=spec.model.name, cuts=cuts, exit_cuts=tuple(c.id for c in net.exit_cuts),
                      num_classes=net.num_classes, timing=timing, exits=exits, nodes=nodes,
                      links=existing.links if existing is not None else {})
    if not (reuse_timing and reuse_exits):
        save_profile(profile, path)
    return ProfileSummary(path, profile, reuse_timing, reuse_exits, None), net


def calibrated_exits(net: EarlyExitNet) -> tuple[int, ...]:
    """The early exits a package evaluates when no plan turns any off: those with a finite threshold."""
    return tuple(i for i, t in enumerate(net.policy.thresholds) if math.isfinite(t))


def plan_package(package: Path, cluster_file: Path, *, objective: Objective = DEFAULT_OBJECTIVE,
                 top: int = DEFAULT_TOP, codecs: Sequence[str] | None = None, keep_exits: bool = False,
                 edge_may_skip: bool = True, data: str | None = None, force_profile: bool = False,
                 measured_links: Mapping[tuple[str, str], LinkEstimate] | None = None,
                 write_to: Path | None = None, sweep: bool = False,
                 progress: Progress | None = None, trust_models: Sequence[str] = (),
                 edge: str | None = None) -> PlanSummary:
    """Profile (or reuse the profile), then plan ``package`` on the cluster file's chain.

    ``keep_exits`` keeps every calibrated exit active (what ``run --no-plan`` serves) instead of choosing.
    ``measured_links`` is where link figures measured by the runtime plug in (see
    :func:`~splitexit.plan.topology.topology_from_cluster`); without it, the links ``splitexit profile
    --cluster`` measured (while they still match the file), else the file's figures. ``write_to`` writes
    the cluster file that serves the best plan (:func:`write_plan`); ``sweep`` plans again across uplink
    bandwidths (:func:`sweep_bandwidth`). ``edge`` is the edge planned for, in a file with several.
    """
    whole = load_cluster(cluster_file)
    if write_to is not None and len(whole.edges) > 1:
        raise ConfigError(f"--write: {cluster_file} declares {len(whole.edges)} edges, and a written plan's "
                          "`ends_at` would fix one edge's cuts for all of them; let each `splitexit run --edge NAME` "
                          "plan its own")
    cluster = whole.for_edge(edge)
    summary, net = _profile(package, data=data, force=force_profile, progress=progress,
                            trust_models=(*trust_models, *cluster.trusted_models))
    if measured_links is None:
        measured_links = stored_link_estimates(summary.profile, cluster)
    topology = topology_from_cluster(cluster, measured_links=measured_links)
    exit_sets = [calibrated_exits(net)] if keep_exits else None
    result = plan(summary.profile, topology, objective, codecs=codecs, exit_sets=exit_sets,
                  edge_may_skip=edge_may_skip, top=top)
    configured = _configured(summary.profile, topology, cluster, objective, net)
    written = write_plan(cluster_file, cluster, result.best, write_to, package) if write_to is not None else None
    swept = tuple(sweep_bandwidth(summary.profile, topology, objective, codecs=codecs,
                                  edge_may_skip=edge_may_skip)) if sweep else ()
    return PlanSummary(result, replace(summary, topology=topology), topology, cluster, configured, written, swept)


def objective_from(kind: str | None, deadline: str | None) -> Objective:
    """``--objective`` and ``--deadline`` as an :class:`Objective`: deadline when only a deadline is given."""
    try:
        budget = parse_duration(deadline) if deadline is not None else None
    except ValueError as exc:
        raise ConfigError(f"--deadline: {exc}") from None
    chosen = kind or ("deadline" if budget is not None else DEFAULT_OBJECTIVE.kind)
    return Objective(kind=chosen, deadline=budget)  # type: ignore[arg-type]  # Objective checks the name itself


def _configured(profile: Profile, topology: Topology, cluster: ClusterSpec, objective: Objective,
                net: EarlyExitNet) -> Plan | None:
    """The prediction for the layout the cluster file sets itself (``ends_at`` on every tier but the last)."""
    tiers = [members for _, members in sorted(cluster.tiers().items())]
    ends = [next((n.ends_at for n in members if n.ends_at is not None), None) for members in tiers[:-1]]
    if any(e is None for e in ends):
        return None
    try:
        cuts: list[Cut] = [MODEL_INPUT if e is MODEL_INPUT else net.graph.resolve(e).id for e in ends if e is not None]
        bounds: list[Cut] = [MODEL_INPUT, *cuts, MODEL_OUTPUT]
        stages = [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
                  if not (i == 0 and b is MODEL_INPUT)]  # a skipped edge computes nothing
        codecs = [cluster.link(a[0].name, b[0].name).codec for a, b in zip(tiers, tiers[1:])]
        codecs = ["raw" if c == "auto" else c for c in codecs]
        return predict(profile, topology, stages, calibrated_exits(net), codecs, objective=objective,
                       label="as configured")
    except (ConfigError, CutError) as exc:
        logger.info("cannot predict the cluster file's own layout: %s", exc)
        return None


def write_plan(cluster_file: Path, cluster: ClusterSpec, chosen: Plan, out: Path, package: Path) -> Path:
    """Write the cluster file that serves ``chosen`` (see :func:`~splitexit.plan.result.apply_plan`)."""
    planned = apply_plan(cluster, chosen)
    data = planned.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=False)
    # secrets stay in their files: the written file names them (absolute paths), as the user's file did
    unread = load_cluster(cluster_file, read_secrets=False)
    data["security"] = unread.security.model_dump(mode="json", exclude_none=True)
    if not isinstance(unread.registry, str):
        data["registry"] = unread.registry.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["package"] = str(package.resolve())
    exits = ", ".join(map(str, chosen.active_exits)) or "none"
    header = (f"# written by `splitexit plan` from {cluster_file} ({chosen.objective}): {chosen.describe()}\n"
              f"# predicted {chosen.latency_ms:.2f} ms, {chosen.throughput_per_s:.1f}/s; "
              f"active early exits: {exits} (this file cannot carry them: `run --no-plan` evaluates every "
              "calibrated exit, `run` plans and applies its own)\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out


def sweep_bandwidth(profile: Profile, topology: Topology, objective: Objective, *,
                    codecs: Sequence[str] | None = None, edge_may_skip: bool = True,
                    points: int = SWEEP_POINTS) -> list[SweepPoint]:
    """The best plan and both baselines at ``points`` uplink bandwidths from SWEEP_FROM to SWEEP_TO."""
    if len(topology.tiers) < 2:
        raise ConfigError("sweeping the uplink needs a cluster with at least one worker after the edge")
    sweep = []
    for bandwidth in np.geomspace(SWEEP_FROM, SWEEP_TO, points):
        result = plan(profile, topology.with_bandwidth(float(bandwidth)), objective, codecs=codecs,
                      edge_may_skip=edge_may_skip, top=1)
        sweep.append(SweepPoint(float(bandwidth), result.best, result.edge_only, result.cloud_only))
    return sweep
