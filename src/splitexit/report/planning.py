"""What `profile` and `plan` show: rich tables, the JSON objects, and the bandwidth-sweep plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table
from rich.text import Text

from splitexit.app.plan import PlanSummary, ProfileSummary, SweepPoint
from splitexit.cuts import MODEL_OUTPUT, cut_label
from splitexit.plan.result import describe_route
from splitexit.report.formats import format_bytes

if TYPE_CHECKING:
    from splitexit.plan.objective import Objective
    from splitexit.plan.profile import MachineProfile
    from splitexit.plan.result import Plan
    from splitexit.plan.topology import Topology

__all__ = ["plan_json", "plan_table", "plot_sweep", "profile_json", "profile_tables"]

#: Size and resolution of the bandwidth-sweep PNG.
SWEEP_SIZE = (8.0, 4.8)
SWEEP_DPI = 120


def profile_json(summary: ProfileSummary) -> dict[str, object]:
    return {"profile": str(summary.path), "reused_timing": summary.reused_timing,
            "reused_exits": summary.reused_exits, "measured_now": list(summary.measured_now),
            **summary.profile.to_json()}


def profile_tables(summary: ProfileSummary) -> list[Table]:
    """Compute per segment and head, bytes per codec, exits; with a cluster, its nodes and links too."""
    profile, m = summary.profile, summary.profile.timing
    sizes = m.batch_sizes
    tiers = summary.topology.tiers if summary.topology is not None else ()
    scales = sorted({t.compute_scale for t in tiers if t.compute_scale != 1})

    segments = Table(title=f"Compute on {m.measured_on} (median ms per call; IQR)", title_justify="left")
    for column in ("segment", "MFLOPs", *(f"batch {b}" for b in sizes), *(f"batch 1 ×{s:g}" for s in scales)):
        segments.add_column(column, justify="left" if column == "segment" else "right")
    for s in m.segments:
        cells = [f"{s.seconds[b].median * 1e3:.3f} ({s.seconds[b].iqr * 1e3:.3f})" for b in sizes]
        segments.add_row(f"{cut_label(s.start)} → {cut_label(s.end)}", f"{s.flops / 1e6:.2f}", *cells,
                         *(f"{s.at(1) * k * 1e3:.3f}" for k in scales))
    for h in m.heads:
        final = h.cut is MODEL_OUTPUT
        segments.add_row(f"exit {h.exit} {'(final: scoring)' if final else f'head at cut {h.cut}'}", "",
                         *(f"{h.seconds[b].median * 1e3:.3f} ({h.seconds[b].iqr * 1e3:.3f})" for b in sizes),
                         *(f"{h.at(1) * k * 1e3:.3f}" for k in scales))
    idle = ", ".join(f"{gap * 1e3:g} ms: ×{factor:.2f}" for gap, factor in sorted(m.idle_factors.items()))
    segments.caption = (f"per stage +{m.stage_call_at(1) * 1e3:.3f} ms routing, "
                        f"per part +{m.call_overhead.median * 1e3:.4f} ms call; after idling ({idle})")
    codecs = list(m.transfers[0].codecs)
    transfer = Table(title="Bytes per sample on the wire (encode + decode µs)", title_justify="left")
    for column in ("crossing", "raw bytes", *codecs):
        transfer.add_column(column, justify="left" if column == "crossing" else "right")
    for t in m.transfers:
        transfer.add_row(cut_label(t.cut), str(t.raw_bytes),
                         *(f"{c.bytes:.0f} ({(c.encode_s + c.decode_s) * 1e6:.0f})" for c in t.codecs.values()))
    usable = profile.exits.usable()
    exits = Table(title=f"Exits on {profile.exits.samples} calibration samples (every calibrated exit active)",
                  title_justify="left")
    for column in ("exit", "cut", "exit rate", "right if answered here"):
        exits.add_column(column, justify="right")
    rates = profile.exits.exit_rates(usable)
    for i, rate in enumerate(rates):
        cut = profile.exit_cuts[i] if i < len(profile.exit_cuts) else "output"
        exits.add_row(str(i), str(cut), f"{rate:.1%}", f"{profile.exits.correct[i].mean():.2%}")
    exits.caption = f"cascade accuracy {profile.exits.accuracy(usable):.2%}"
    tables = [segments, transfer, exits]
    if profile.nodes:
        nodes = Table(title="Compute measured on the nodes (whole model, batch 1; the planner multiplies by slowdown)",
                      title_justify="left")
        for column in ("node", "ms", f"vs {m.measured_on}", "machine"):
            nodes.add_column(column, justify="left" if column in ("node", "machine") else "right")
        here = _whole_model_seconds(m)
        for name, machine in sorted(profile.nodes.items()):
            there = _whole_model_seconds(machine)
            nodes.add_row(name, f"{there * 1e3:.3f}", f"×{there / here:.2f}", str(machine.key.get("machine", "")))
        tables.append(nodes)
    if summary.topology is not None:
        links = Table(title="Links as the planner sees them (measured through the runtime where probed)",
                      title_justify="left")
        for column in ("link", "bandwidth", "latency", "jitter", "loss", "from", "probe round trip"):
            links.add_column(column, justify="left" if column in ("link", "from") else "right")
        for a, b, link in summary.topology.named_links():
            width = "unlimited" if link.bandwidth is None else f"{link.bandwidth / 1e6:.3g} Mbit/s"
            probed = profile.links.get((a.split("|")[0], b.split("|")[0]))
            links.add_row(f"{a} → {b}", width, f"{link.latency * 1e3:.3g} ms", f"{link.jitter * 1e3:g} ms",
                          f"{link.loss:.1%}", link.origin, f"{probed.rtt * 1e3:.2f} ms" if probed else "")
        tables.append(links)
    return tables


def _whole_model_seconds(machine: MachineProfile) -> float:
    return sum(s.at(1) for s in machine.segments) + sum(h.at(1) for h in machine.heads)


def plan_json(summary: PlanSummary) -> dict[str, object]:
    result, goal = summary.result, summary.result.objective
    return {"objective": goal.kind, "deadline_ms": goal.deadline * 1e3 if goal.deadline is not None else None,
            "profile": str(summary.profile.path),
            "profile_reused": summary.profile.reused_timing and summary.profile.reused_exits,
            "best": result.best.to_dict(),
            "candidates": [p.to_dict() for p in result.candidates],
            "edge_only": result.edge_only.to_dict(), "cloud_only": result.cloud_only.to_dict(),
            "as_configured": summary.configured.to_dict() if summary.configured else None,
            "speedup": {"edge_only": result.speedup(result.edge_only),
                        "cloud_only": result.speedup(result.cloud_only)},
            "written": str(summary.written) if summary.written else None}


def plan_table(summary: PlanSummary) -> Table:
    """The ranked candidates, then edge-only, cloud-only and the cluster file's own layout."""
    result = summary.result
    goal = result.objective
    title = f"Plans for {goal.kind}" + (f" within {goal.deadline * 1e3:g} ms" if goal.deadline else "")
    table = Table(title=title, title_justify="left")
    for column in ("", "stages", "exits", "codecs", "latency ms", "inputs/s", "bytes/input", "accuracy"):
        table.add_column(column, justify="left" if column in ("", "stages", "exits", "codecs") else "right")

    def row(label: str, p: Plan) -> None:
        stages = describe_route(p.stages, compact=True)
        if p.skipped:
            stages += f" (skips {', '.join(p.skipped)})"
        exits = ",".join(map(str, p.active_exits)) or "-"
        codecs = " / ".join(link.codec for link in p.links) or "-"
        sent = " / ".join(format_bytes(b) for b in p.bytes_per_input) or "-"
        latency = f"{p.latency_ms:.2f}" + ("" if p.meets_deadline else " ✗")
        table.add_row(label, Text(stages), exits, codecs, latency, f"{p.throughput_per_s:.1f}", sent,
                      f"{p.accuracy:.2%}")

    for rank, p in enumerate(result.candidates, 1):
        row("best" if rank == 1 else f"#{rank}", p)
    table.add_section()
    row("edge-only", result.edge_only)
    row("cloud-only", result.cloud_only)
    if summary.configured is not None:
        row("as configured", summary.configured)
    better = "higher throughput" if goal.kind == "throughput" else "faster"
    table.caption = (f"best: {result.speedup(result.edge_only):.2f}× {better} than edge-only, "
                     f"{result.speedup(result.cloud_only):.2f}× than cloud-only · "
                     f"bottleneck: {result.best.bottleneck}\n"
                     "one request at a time (window 1); exits: active early exits (the final one always answers)")
    return table


def plot_sweep(sweep: tuple[SweepPoint, ...], objective: Objective, topology: Topology, out: Path) -> Path:
    """The objective's metric of the best plan and both baselines against uplink bandwidth, as a PNG."""
    throughput = objective.kind == "throughput"

    def metric(p: Plan) -> float:
        return p.throughput_per_s if throughput else p.latency_ms

    x = [s.bandwidth / 1e6 for s in sweep]
    figure = Figure(figsize=SWEEP_SIZE, dpi=SWEEP_DPI, layout="tight")
    ax = figure.subplots()
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
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(out))
    return out
