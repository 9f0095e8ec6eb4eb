"""The demo's steps on the terminal: a rule per step, the training bar, then each step's table."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import Progress, TaskID

from splitexit.app.demo import (
    DEMO_DROP_AFTER,
    DEMO_DROPPED,
    DEMO_EPOCHS,
    DEMO_MAX_DROP,
    DEMO_MODEL,
    DEMO_SLOWDOWN,
    DEMO_UPLINK,
    DEMO_UPLINK_LATENCY,
    DemoPaths,
    DemoStep,
)
from splitexit.app.plan import PlanSummary
from splitexit.model.calibrate import CalibrationReport
from splitexit.model.evaluate import EvalReport
from splitexit.model.train import EpochResult
from splitexit.report.console import calibration_table, eval_table
from splitexit.report.planning import plan_table
from splitexit.report.progress import epoch_description, progress_bar
from splitexit.units import parse_duration

__all__ = ["DemoConsole"]


class DemoConsole:
    """A :class:`~splitexit.app.demo.DemoObserver` that prints to ``out`` (the training bar to ``err``).

    Use it as a context manager, so that a bar still running when a step fails is closed.
    """

    def __init__(self, paths: DemoPaths, out: Console, err: Console):
        self.paths, self.out, self.err = paths, out, err
        self._bar: tuple[Progress, TaskID] | None = None

    def __enter__(self) -> DemoConsole:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._close_bar()

    def begin(self, step: DemoStep) -> None:
        self._close_bar()
        self.out.rule(self._title(step))
        if step is DemoStep.TRAIN:
            bar = progress_bar(self.err)
            bar.start()
            self._bar = (bar, bar.add_task("training", total=DEMO_EPOCHS))

    def epoch(self, result: EpochResult) -> None:
        if self._bar is not None:
            bar, task = self._bar
            bar.update(task, completed=result.epoch, description=epoch_description(result))

    def calibrated(self, report: CalibrationReport) -> None:
        self.out.print(calibration_table(report))

    def evaluated(self, report: EvalReport) -> None:
        self.out.print(eval_table(report, title=f"{DEMO_MODEL} with early exits"))

    def planned(self, summary: PlanSummary) -> None:
        self.out.print(plan_table(summary))

    def _title(self, step: DemoStep) -> str:
        titles = {
            DemoStep.TRAIN: f"1. train {DEMO_MODEL} with automatic early exits (joint, from scratch)",
            DemoStep.REUSE: f"1. reuse the trained package in {self.paths.package} (--fresh retrains)",
            DemoStep.CALIBRATE: f"2. calibrate: keep accuracy within {DEMO_MAX_DROP * 100:g} point of the final exit",
            DemoStep.EVALUATE: "3. evaluate in one process on the held-out test split",
            DemoStep.PLAN: f"4. plan: edge ({DEMO_SLOWDOWN}x slower) → cloud1 → cloud2 over a {DEMO_UPLINK}/s, "
                           f"{parse_duration(DEMO_UPLINK_LATENCY) * 1e3:g} ms uplink ({self.paths.cluster_file})",
            DemoStep.SERVE: f"5. serve the plan; {DEMO_DROP_AFTER:g} s in, the uplink drops to {DEMO_DROPPED}/s: "
                            "watch the entry re-plan",
        }
        return titles[step]

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar[0].stop()
            self._bar = None
