"""Readable tables for the terminal (rich). Only the CLI prints; these functions build the renderables."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Group
from rich.table import Table
from rich.text import Text

from splitexit.app.infer import ImageAnswer
from splitexit.app.train import TrainSummary
from splitexit.model.calibrate import CalibrationReport
from splitexit.model.evaluate import EvalReport
from splitexit.model.graph import CutPoint
from splitexit.report.formats import format_bytes, format_flops
from splitexit.report.run_report import interrupted_text
from splitexit.report.run_summary import RunReport

__all__ = ["calibration_table", "cuts_table", "eval_table", "run_table", "train_json", "train_text"]


def train_text(summary: TrainSummary) -> Group:
    """What `train` did: the loss, then accuracy on held-out data (the final exit's, then each early exit's)."""
    report, net = summary.report, summary.net
    ran = len(report.losses)
    lines = [f"trained {report.mode} for {ran} epochs on {summary.train_samples} samples; loss "
             f"{report.losses[report.kept_epoch - 1]:.4f}; final-exit accuracy {summary.final_accuracy:.2%} on the "
             f"{summary.calib_samples} held-out calibration samples"]
    if report.kept_epoch != ran:
        how = f"stopped after epoch {ran} of {report.epochs}" if report.stopped_early else f"ran all {ran} epochs"
        lines.append(f"  {how}; epoch {report.kept_epoch} had the best validation accuracy, and its weights are kept")
    lines += [f"  exit at {cut.describe()}: accuracy {accuracy:.2%}"
              for cut, accuracy in zip(net.exit_cuts, summary.calib_accuracy)]
    lines.append(f"  cpu: {net.cpu.memory_format}, {net.cpu.threads} threads (measured fastest)")
    return Group(*(Text(line) for line in lines))


def train_json(summary: TrainSummary) -> dict[str, object]:
    net = summary.net
    return {"package": str(summary.package), "exits": [c.describe() for c in net.exit_cuts],
            "losses": summary.report.losses, "validation_accuracy": [list(a) for a in summary.report.accuracy],
            "kept_epoch": summary.report.kept_epoch, "calib_accuracy": summary.final_accuracy,
            "exit_accuracy": list(summary.calib_accuracy), "calib_samples": summary.calib_samples,
            "cpu": net.cpu.model_dump()}


def promise_text(calibration: Mapping[str, object]) -> str | None:
    """What a package's calibration promises about accuracy, from its recorded metadata (None: nothing)."""
    if calibration.get("mode") != "max_drop":
        return None
    target, samples = float(str(calibration["target"])), calibration.get("samples")
    level = calibration.get("guarantee")
    if level is None:
        return f"no promise: drop <= {target:.2%} on the {samples} calibration samples only (a point estimate)"
    if calibration.get("bound") is None:
        return f"promise ({float(str(level)):.0%}): nothing certified on {samples} samples, so no early exits"
    return (f"promise ({float(str(level)):.0%}): drop <= {target:.2%} on new data; certified bound "
            f"{float(str(calibration['bound'])):.2%} from {samples} samples")


def eval_table(report: EvalReport, title: str = "Evaluation", *, promise: str | None = None) -> Table:
    table = Table(title=f"{title}: {report.samples} samples", title_justify="left")
    for column in ("exit", "after", "accuracy", "exit rate", "cumulative acc.", "FLOPs to exit"):
        table.add_column(column, justify="left" if column == "after" else "right")
    for s in report.exits:
        table.add_row(str(s.exit), s.location, f"{s.accuracy:.2%}", f"{s.exit_rate:.1%}",
                      f"{s.cumulative_accuracy:.2%}", format_flops(s.flops))
    table.caption = (f"cascade accuracy {report.accuracy:.2%} (final exit alone {report.final_exit_accuracy:.2%}) · "
                     f"compute {report.compute_fraction:.1%} of the full model "
                     f"({format_flops(report.model_flops)} FLOPs)")
    if promise:
        table.caption += f"\n{promise}"
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
    if promise := promise_text(report.as_metadata()):
        table.caption += f"\n{promise}"
    if report.warning:
        table.caption += f"\nwarning: {report.warning}"
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
                      format_bytes(cut.bytes_per_sample), f"{format_flops(cut.flops_before)} ({share:.0%})")
    return table


def _maybe(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def run_table(report: RunReport) -> Group:
    """A run as four tables: summary (with latency percentiles), exits, latency breakdown, links.

    The summary is a table of its own rather than a title, because rich wraps titles to the table's width.
    Node and link names go in as :class:`~rich.text.Text`, so a name with brackets is not read as markup.
    """
    lat = report.latency_ms
    summary = Table(title=f"Run: {report.samples} samples", title_justify="left", show_header=False,
                    caption=interrupted_text(report), caption_justify="left")
    summary.add_column("", justify="left")
    summary.add_column("", justify="left")
    summary.add_row("accuracy", _maybe(report.accuracy, ".2%", "n/a (no labels)"))
    summary.add_row("errors", str(report.errors))
    summary.add_row("throughput", f"{_maybe(report.throughput, '.1f')} samples/s over {report.wall_s:.2f} s")
    summary.add_row("latency (ms)", " · ".join(f"{k} {_maybe(lat.get(k), '.2f')}"
                                               for k in ("p50", "p95", "p99", "mean", "max")))
    summary.add_row("placement", Text(report.placement))
    if report.resubmitted:
        summary.add_row("resubmitted", f"{report.resubmitted} requests (a node failed while holding them)")
    if report.fallbacks:
        summary.add_row("fallback", f"{report.fallbacks} answered at the edge (the chain could not in time)")
    if len(report.plan_changes) > 1:
        start = report.plan_changes[0]["time"]
        for change in report.plan_changes[1:]:
            summary.add_row("re-planned", Text(f"+{change['time'] - start:.2f} s: {change['reason']} → "
                                               f"{change['placement']}"))
    for event in report.membership:
        summary.add_row("membership", Text(f"+{event['at_s']:.2f} s: {event['node']} {event['event']}"))
    if report.stage_bytes:
        summary.add_row("stages shipped", ", ".join(f"{n} {format_bytes(b)}" for n, b in report.stage_bytes.items()))

    exits = Table(title="Exits", title_justify="left")
    for column in ("exit", "node", "requests", "rate", "accuracy"):
        exits.add_column(column, justify="left" if column == "node" else "right")
    for e in report.exits:
        exits.add_row(_maybe(e["exit"], "d"), Text(e["node"]), str(e["count"]), f"{e['rate']:.1%}",
                      _maybe(e["accuracy"], ".2%"))

    breakdown = Table(title="Mean latency breakdown", title_justify="left")
    for column in ("part", "ms", "share"):
        breakdown.add_column(column, justify="left" if column == "part" else "right")
    total = sum(v for v in report.breakdown_ms.values() if v is not None)
    for part, value in report.breakdown_ms.items():
        share = value / total if value is not None and total > 0 else None
        breakdown.add_row(part, _maybe(value, ".3f"), _maybe(share, ".1%"))

    links = Table(title="Links", title_justify="left")
    for column in ("link", "raw", "wire", "raw/wire", "messages", "rows"):
        links.add_column(column, justify="left" if column == "link" else "right")
    for name, v in report.links.items():
        links.add_row(Text(name), format_bytes(v["raw_bytes"]), format_bytes(v["wire_bytes"]),
                      _maybe(v["ratio"], ".2f"), str(v["messages"]), str(v["rows"]))
    if not report.links:
        links.add_row(Text("none: one node ran the whole model"), "", "", "", "", "")
    return Group(summary, exits, breakdown, links)


def infer_table(answers: list[ImageAnswer]) -> Table:
    """One row per image: the class (by name where the package names its classes), and who answered."""
    table = Table(title="Inference", title_justify="left")
    for name in ("image", "class", "confidence", "exit", "node", "latency (ms)"):
        table.add_column(name, justify="left" if name in ("image", "class", "node") else "right")
    for a in answers:
        label = a.error or (f"{a.name} ({a.prediction})" if a.name is not None else str(a.prediction))
        table.add_row(Text(a.image), Text(label), _maybe(a.confidence, ".3f"),
                      "-" if a.exit is None else str(a.exit), Text(a.node), f"{a.latency_ms:.2f}")
    return table
