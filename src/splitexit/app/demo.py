"""The whole story on one machine (`splitexit demo`): train or reuse, calibrate, evaluate, plan, then serve
edge → cloud1 → cloud2 while the uplink degrades, so that the entry re-plans.

:func:`run_demo` does the work and tells a :class:`DemoObserver` what it is doing and what each step
found; the CLI's observer (``report/demo_console.py``) renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import yaml

from splitexit.app.plan import PlanSummary, plan_package
from splitexit.app.run import run_cluster, start_cluster
from splitexit.app.train import DEFAULT_MAX_DROP, calibrate_package, evaluate_package, train_package
from splitexit.config import TrainConfig
from splitexit.control.edge import RunResult
from splitexit.control.local_cluster import free_port
from splitexit.errors import PackageError
from splitexit.model.calibrate import CalibrationReport
from splitexit.model.evaluate import EvalReport
from splitexit.model.manifest import read_manifest
from splitexit.model.package import SPEC_FILE, read_spec
from splitexit.model.train import EpochResult

__all__ = ["DEMO_DIR", "DEMO_DROPPED", "DEMO_DROP_AFTER", "DEMO_EPOCHS", "DEMO_MAX_DROP", "DEMO_MODEL",
           "DEMO_SLOWDOWN", "DEMO_UPLINK", "DemoObserver", "DemoPaths", "DemoStep", "run_demo",
           "write_demo_cluster"]

#: Where the demo keeps its package, cluster file, logs and report between runs.
DEMO_DIR = Path(".splitexit-cache/demo")
#: The model and data the demo trains: small enough to train in seconds on a CPU.
DEMO_MODEL, DEMO_DATA = "digits_cnn", "digits"
DEMO_EPOCHS = 30
#: Accuracy the demo's calibration may give up against the final exit.
DEMO_MAX_DROP = DEFAULT_MAX_DROP
#: The demo's edge is this many times slower than this machine; its uplink, and what the uplink drops to.
DEMO_SLOWDOWN, DEMO_UPLINK, DEMO_DROPPED = 24, "50Mbit", "0.05Mbit"
DEMO_UPLINK_LATENCY = "2ms"
#: Seconds into the demo's run when its emulated uplink drops.
DEMO_DROP_AFTER = 1.0


class DemoStep(Enum):
    """The demo's steps in order (TRAIN or REUSE first)."""

    TRAIN = "train"
    REUSE = "reuse"
    CALIBRATE = "calibrate"
    EVALUATE = "evaluate"
    PLAN = "plan"
    SERVE = "serve"


@dataclass(frozen=True)
class DemoPaths:
    """Everything the demo writes, under one directory."""

    workdir: Path

    @property
    def package(self) -> Path:
        return self.workdir / DEMO_MODEL

    @property
    def cluster_file(self) -> Path:
        return self.workdir / "cluster.yaml"

    @property
    def stages(self) -> Path:
        return self.workdir / "stages"

    @property
    def results(self) -> Path:
        return self.workdir / "results.jsonl"

    @property
    def report_dir(self) -> Path:
        return self.workdir / "report"


class DemoObserver(Protocol):
    """What the demo reports as it goes: each step before its work, then what the step found."""

    def begin(self, step: DemoStep) -> None: ...

    def epoch(self, result: EpochResult) -> None: ...

    def calibrated(self, report: CalibrationReport) -> None: ...

    def evaluated(self, report: EvalReport) -> None: ...

    def planned(self, summary: PlanSummary) -> None: ...


def run_demo(paths: DemoPaths, observer: DemoObserver, *, fresh: bool = False) -> RunResult:
    """Run every step (training only with ``fresh`` or when no readable package is left from before)."""
    package = paths.package
    if fresh or not _usable(package):
        observer.begin(DemoStep.TRAIN)
        train_package(DEMO_MODEL, DEMO_DATA, package, config=TrainConfig(epochs=DEMO_EPOCHS),
                      on_epoch=observer.epoch)
    else:
        observer.begin(DemoStep.REUSE)
    observer.begin(DemoStep.CALIBRATE)
    observer.calibrated(calibrate_package(package, max_drop=DEMO_MAX_DROP))
    observer.begin(DemoStep.EVALUATE)
    observer.evaluated(evaluate_package(package))
    write_demo_cluster(paths.cluster_file, package, drop_after=DEMO_DROP_AFTER)
    observer.begin(DemoStep.PLAN)
    observer.planned(plan_package(package, paths.cluster_file))
    observer.begin(DemoStep.SERVE)
    local = start_cluster(paths.cluster_file, log_dir=paths.workdir, cache_root=paths.stages)
    try:
        return run_cluster(package, paths.cluster_file)
    finally:
        local.stop()


def write_demo_cluster(path: Path, package: Path, *, drop_after: float = DEMO_DROP_AFTER) -> Path:
    """A 3-node cluster on free loopback ports: a slow edge (``DEMO_SLOWDOWN``), a ``DEMO_UPLINK`` uplink
    that drops to ``DEMO_DROPPED`` ``drop_after`` seconds into the run, and a fast datacentre hop. One
    request at a time (window 1), the case the planner's latency model describes.

    Before the drop the planner sends the input to the cloud; once the drop is measured, computing on the
    edge is several times faster and the entry re-plans. Both margins are wide so that the story holds on
    a loaded machine too. The file declares no edge -> cloud2 link, so a plan that skips cloud1 is planned
    over the uplink too, and one measured drop reaches every plan that sends anything.
    """
    spec = {
        "package": str(package.resolve()),
        "nodes": [{"name": "edge", "role": "edge", "slowdown": DEMO_SLOWDOWN},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "bandwidth": DEMO_UPLINK, "latency": DEMO_UPLINK_LATENCY,
                   "codec": "auto", "changes": [{"at": f"{drop_after:g}s", "bandwidth": DEMO_DROPPED}]},
                  {"from": "cloud1", "to": "cloud2", "bandwidth": "1Gbit", "latency": "1ms", "codec": "auto"}],
        "batching": {"max_batch": 8, "max_wait": "2ms"},
        "window": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _usable(package: Path) -> bool:
    """Whether an earlier demo left a readable package to reuse (one older splitexits wrote has no manifest)."""
    try:
        read_spec(package)
        read_manifest(package, package / SPEC_FILE)
        return True
    except PackageError:
        return False
