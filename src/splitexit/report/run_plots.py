"""The run report's plots: latency over time (plan and membership changes marked), latency by node, the
breakdown, exits, bytes per link and the confusion matrix, each a :class:`~matplotlib.figure.Figure`.

Figures use the Agg canvas directly: importing this module selects no backend and touches no global
pyplot state. Legends sit outside the axes, so they never cover the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from splitexit.report.formats import BYTE_UNITS
from splitexit.report.run_summary import PERCENTILES, RunReport, exit_key
from splitexit.runtime.records import BREAKDOWN, RequestRecord

__all__ = ["PLOT_DPI", "figures"]

#: Resolution of the PNG plots; 100 dpi keeps the embedded HTML page small and still sharp on screen.
PLOT_DPI = 100
PLOT_SIZE = (8.0, 4.0)
#: One fixed colour per latency part, so every plot and page uses the same legend.
PART_COLOURS = dict(zip(BREAKDOWN, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")))
#: Colours of the marks on the latency-over-time plot.
PLAN_COLOUR, MEMBERSHIP_COLOUR = "#2a9d8f", "#c44e52"
#: Latencies spread wider than this (max / min) are drawn on a log axis.
LOG_SPREAD = 20.0


def figures(report: RunReport, records: list[RequestRecord]) -> dict[str, Figure]:
    """Every plot of the report, by file stem (``confusion`` only when the run had labels)."""
    answered = [r for r in records if r.error is None]
    start = report.started_at or min((r.finished - r.latency_ms / 1e3 for r in records), default=0.0)
    plots = {"timeline": _timeline_figure(report, answered, start), "latency": _latency_figure(answered),
             "breakdown": _breakdown_figure(answered), "exits": _exits_figure(report), "links": _links_figure(report)}
    if report.confusion is not None:
        plots["confusion"] = _confusion_figure(report.confusion)
    return plots


def _text(value: object) -> str:
    """A label matplotlib shows literally: a ``$`` in a node name would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


def _figure(ncols: int = 1, size: tuple[float, float] = PLOT_SIZE) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _outside(ax: Any, **options: Any) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **options)


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _by_node(records: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    """Records grouped by answering node, nodes in the order of their first exit (the chain's order)."""
    groups: dict[str, list[RequestRecord]] = {}
    for record in sorted(records, key=lambda r: exit_key(r.exit)):
        groups.setdefault(record.node, []).append(record)
    return groups


def _timeline_figure(report: RunReport, answered: list[RequestRecord], started_at: float) -> Figure:
    """Each answer's latency at the time it arrived, a rolling median, each plan's predicted latency over
    its span, and a line at every plan change and membership change, named."""
    figure, (ax,) = _figure(size=(10.0, 4.5))
    ax.set_title("Latency over time")
    if not answered:
        _empty(ax, "no answered requests")
        return figure
    at = np.array([r.finished - started_at for r in answered])
    latency = np.array([r.latency_ms for r in answered])
    for node, rows in _by_node(answered).items():
        ax.scatter([r.finished - started_at for r in rows], [r.latency_ms for r in rows], s=6, alpha=0.5,
                   label=_text(f"answered at {node}"))
    order = np.argsort(at)
    window = max(1, len(order) // 30)
    rolling = [float(np.median(latency[order][max(0, i - window):i + window + 1])) for i in range(len(order))]
    ax.plot(at[order], rolling, color="black", linewidth=1.2, label=f"rolling median ({2 * window + 1} answers)")
    changes = report.plan_changes
    ends = [c["at_s"] for c in changes[1:]] + [max(float(at.max()), report.wall_s)]
    predicted = {p["plan"]: p["predicted_ms"] for p in report.plans}
    drawn = False
    for change, end in zip(changes, ends):
        value = predicted.get(change["plan"])
        if value is not None:
            ax.hlines(value, change["at_s"], end, colors=PLAN_COLOUR, linestyles="--", linewidth=1.2,
                      label=None if drawn else "predicted (planner)")
            drawn = True
    for change in changes[1:]:
        ax.axvline(change["at_s"], color=PLAN_COLOUR, linewidth=1.0)
        ax.annotate(_text(f"re-planned: {change['cause']}"), (change["at_s"], 1.0),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize="small",
                    color=PLAN_COLOUR)
    for event in report.membership:
        ax.axvline(event["at_s"], color=MEMBERSHIP_COLOUR, linestyle=":", linewidth=1.0)
        ax.annotate(_text(f"{event['node']} {event['event']}"), (event["at_s"], 0.0),
                    xycoords=("data", "axes fraction"), rotation=90, va="bottom", ha="left", fontsize="small",
                    color=MEMBERSHIP_COLOUR)
    if float(latency.max()) > LOG_SPREAD * max(float(latency.min()), 1e-3):
        ax.set_yscale("log")
    ax.set(xlabel="seconds since the run began", ylabel="latency (ms)")
    _outside(ax, markerscale=2)
    return figure


def _latency_figure(answered: list[RequestRecord]) -> Figure:
    figure, (hist, cdf) = _figure(2, size=(10.0, 4.0))
    figure.suptitle("End-to-end latency by answering node")
    if not answered:
        _empty(hist, "no answered requests")
        _empty(cdf, "no answered requests")
        return figure
    every = np.array([r.latency_ms for r in answered])
    bins = np.histogram_bin_edges(every, bins=min(40, max(5, int(math.sqrt(every.size)))))
    for node, rows in _by_node(answered).items():
        values = np.sort([r.latency_ms for r in rows])
        hist.hist(values, bins=bins, histtype="step", linewidth=1.5, label=_text(f"{node} ({values.size})"))
        cdf.step(values, np.arange(1, values.size + 1) / every.size, where="post", label=_text(node))
    ordered = np.sort(every)
    cdf.step(ordered, np.arange(1, ordered.size + 1) / ordered.size, where="post", color="black",
             linewidth=1, label="all")
    for q, style in zip(PERCENTILES, (":", "--", "-.")):
        cdf.axvline(float(np.percentile(every, q)), color="0.5", linestyle=style, linewidth=0.8, label=f"p{q}")
    hist.set(xlabel="latency (ms)", ylabel="requests", title="histogram")
    cdf.set(xlabel="latency (ms)", ylabel="share of answered requests", title="CDF (share of all answered)",
            ylim=(0, 1.02))
    _outside(cdf)
    return figure


def _breakdown_figure(answered: list[RequestRecord]) -> Figure:
    figure, (ax,) = _figure()
    ax.set_title("Mean latency breakdown by answering node")
    groups = _by_node(answered)
    if not groups:
        _empty(ax, "no answered requests")
        return figure
    names = list(groups)
    bottom = np.zeros(len(names))
    for part in BREAKDOWN:
        heights = np.array([np.mean([r.breakdown_ms.get(part, 0.0) for r in groups[n]]) for n in names])
        ax.bar(range(len(names)), heights, bottom=bottom, label=part, color=PART_COLOURS[part])
        bottom += heights
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.2f} ms", (i, total), ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(names)), [_text(n) for n in names])
    ax.set(ylabel="mean latency (ms)", ylim=(0, max(bottom.max(), 1e-9) * 1.15))
    _outside(ax)
    return figure


def _exits_figure(report: RunReport) -> Figure:
    figure, (ax,) = _figure()
    ax.set_title(f"Where {report.answered} answered requests exited")
    if not report.exits:
        _empty(ax, "no answered requests")
        return figure
    labels = [_text(f"exit {e['exit']}\n{e['node']}") for e in report.exits]
    counts = [e["count"] for e in report.exits]
    bars = ax.bar(range(len(labels)), counts, color="#4c72b0")
    ax.bar_label(bars, [f"{e['count']} ({e['rate']:.0%})" for e in report.exits], fontsize="small")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="requests", ylim=(0, max(counts) * 1.15))
    return figure


def _links_figure(report: RunReport) -> Figure:
    """Raw and wire bytes per link on a log axis: a codec that saves 20x leaves the wire bar visible."""
    figure, (ax,) = _figure()
    ax.set_title("Bytes sent per link: before encoding (raw) and on the wire")
    links = {name: v for name, v in report.links.items() if v["raw_bytes"] or v["wire_bytes"]}
    if not links:
        _empty(ax, "no bytes crossed a link: the whole model ran on one node")
        return figure
    names = list(links)
    biggest = max(max(v["raw_bytes"], v["wire_bytes"]) for v in links.values())
    unit, scale = next(((u, s) for u, s in BYTE_UNITS if biggest >= s), ("B", 1))
    x = np.arange(len(names))
    raw = ax.bar(x - 0.2, [links[n]["raw_bytes"] / scale for n in names], 0.4, label="raw", color="#c44e52")
    wire = ax.bar(x + 0.2, [links[n]["wire_bytes"] / scale for n in names], 0.4, label="wire", color="#55a868")
    ax.bar_label(raw, fmt="%.3g", fontsize="small")
    ratios = [links[n]["ratio"] for n in names]
    ax.bar_label(wire, [f"{b.get_height():.3g}" + ("" if r is None else f" (×{r:.2f})")
                        for b, r in zip(wire, ratios)], fontsize="small")
    ax.set_xticks(x, [_text(n) for n in names])
    ax.set_yscale("log")
    smallest = min(min(v["raw_bytes"], v["wire_bytes"]) or biggest for v in links.values())
    ax.set(ylabel=f"{unit} (log scale)", ylim=(smallest / scale / 3, biggest / scale * 3))
    _outside(ax)
    return figure


def _confusion_figure(confusion: dict[str, Any]) -> Figure:
    classes, matrix = confusion["classes"], np.array(confusion["matrix"])
    side = min(10.0, 3.0 + 0.35 * len(classes))
    figure, (ax,) = _figure(size=(side + 1.5, side))
    ax.set_title("Confusion matrix (answered, labelled requests)")
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax, label="requests")
    ticks = range(len(classes))
    ax.set_xticks(ticks, [_text(c) for c in classes], rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(ticks, [_text(c) for c in classes])
    ax.set(xlabel="predicted", ylabel="true label")
    if len(classes) <= 20:
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize="small",
                        color="white" if count > threshold else "black")
    return figure
