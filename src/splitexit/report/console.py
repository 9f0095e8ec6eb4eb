"""Readable tables for the terminal (rich). Only the CLI prints; these functions build the renderables."""

from __future__ import annotations

from rich.table import Table

from splitexit.model.calibrate import CalibrationReport
from splitexit.model.evaluate import EvalReport
from splitexit.model.graph import CutPoint

__all__ = ["calibration_table", "cuts_table", "eval_table"]


def _flops(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _bytes(value: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def eval_table(report: EvalReport, title: str = "Evaluation") -> Table:
    table = Table(title=f"{title}: {report.samples} samples", title_justify="left")
    for column in ("exit", "after", "accuracy", "exit rate", "cumulative acc.", "FLOPs to exit"):
        table.add_column(column, justify="left" if column == "after" else "right")
    for s in report.exits:
        table.add_row(str(s.exit), s.location, f"{s.accuracy:.2%}", f"{s.exit_rate:.1%}",
                      f"{s.cumulative_accuracy:.2%}", _flops(s.flops))
    table.caption = (f"cascade accuracy {report.accuracy:.2%} (final exit alone {report.final_exit_accuracy:.2%}) · "
                     f"compute {report.compute_fraction:.1%} of the full model ({_flops(report.model_flops)} FLOPs)")
    return table


def calibration_table(report: CalibrationReport) -> Table:
    table = Table(title=f"Calibration ({report.mode} {report.target:g}, {report.samples} samples)",
                  title_justify="left")
    for column in ("exit", "after", "temperature", "threshold"):
        table.add_column(column, justify="left" if column == "after" else "right")
    for i, name in enumerate(report.exit_names):
        threshold = report.policy.thresholds[i] if i < len(report.policy.thresholds) else None
        shown = "-" if threshold is None else ("never" if threshold == float("inf") else f"{threshold:.4f}")
        table.add_row(str(i), name, f"{report.policy.temperatures[i]:.3f}", shown)
    table.caption = (f"calibration split: cascade accuracy {report.accuracy:.2%} vs final exit "
                     f"{report.final_exit_accuracy:.2%}, compute {report.compute_fraction:.1%}")
    return table


def cuts_table(cuts: list[CutPoint], total_flops: int, *, exits_only: bool) -> Table:
    table = Table(title="Cut points" + (" that can carry an exit" if exits_only else ""), title_justify="left")
    for column in ("id", "after", "ends module", "tensors crossing", "bytes/sample", "FLOPs before"):
        table.add_column(column, justify="right" if column in ("id", "bytes/sample", "FLOPs before") else "left")
    for cut in cuts:
        if exits_only and not cut.can_carry_exit:
            continue
        shapes = " + ".join("x".join(map(str, t.shape)) for t in cut.tensors)
        share = cut.flops_before / total_flops if total_flops else 0.0
        table.add_row(str(cut.id), cut.after, cut.ends_modules[0] if cut.ends_modules else "", shapes,
                      _bytes(cut.bytes_per_sample), f"{_flops(cut.flops_before)} ({share:.0%})")
    return table
