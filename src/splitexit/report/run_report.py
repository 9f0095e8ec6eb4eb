"""What a run did, in numbers and pictures: :func:`summarize` a :class:`RunResult`, then :func:`write_report`.

The summary is computed once, here, so that the console table, ``report.json`` and ``report.html`` can
never disagree. Conventions:

* *answered* records are those without an ``error``; latency, breakdown, exits and throughput count only
  them (a failed request's latency measures how fast it failed, not how fast the system answers).
* exit ``rate`` is a share of the answered samples, so the rates of a run sum to 1; errors are counted
  separately.
* accuracy is over answered records that carry a label, and ``None`` when none does.
* every statistic of an empty population is ``None``, never NaN, so ``report.json`` is strict JSON.
* ``resubmitted`` counts requests the entry had to send more than once (a node died with them);
  ``plan_changes`` lists every placement the coordinator installed, when and why; ``stage_bytes`` is
  the stage-file bytes shipped to each node during the run.

Plots use :class:`matplotlib.figure.Figure` with the Agg canvas directly: importing this module selects
no backend and touches no global pyplot state.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from splitexit.control.edge import RunResult
from splitexit.report.formats import BYTE_UNITS, format_bytes, jsonable
from splitexit.runtime.records import BREAKDOWN, RequestRecord

__all__ = ["RunReport", "summarize", "write_report"]

#: Latency percentiles the report shows, in order.
PERCENTILES = (50, 95, 99)
#: Resolution of the PNG plots; 100 dpi keeps the embedded HTML page small and still sharp on screen.
PLOT_DPI = 100
PLOT_SIZE = (7.0, 4.0)
#: One fixed colour per latency part, so every plot and page uses the same legend.
PART_COLOURS = dict(zip(BREAKDOWN, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")))
HTML_TITLE = "splitexit run report"


@dataclass(frozen=True)
class RunReport:
    """Summary of one run; see the module docstring for what each number counts.

    ``exits`` holds one dict per (exit, node) pair: ``exit``, ``node``, ``count``, ``rate``, ``accuracy``.
    ``links`` maps ``"edge->cloud1"`` to ``raw_bytes``, ``wire_bytes``, ``ratio`` (raw / wire; above 1
    means the codec saved bytes), ``messages`` and ``rows``.
    """

    samples: int
    errors: int
    accuracy: float | None
    exits: tuple[dict[str, Any], ...]
    nodes: dict[str, int]
    latency_ms: dict[str, float | None]
    breakdown_ms: dict[str, float | None]
    throughput: float | None
    wall_s: float
    links: dict[str, dict[str, Any]]
    placement: str
    resubmitted: int = 0
    plan_changes: tuple[dict[str, Any], ...] = ()
    stage_bytes: dict[str, int] | None = None
    interrupted_of: int | None = None  # the run was stopped after `samples` of this many inputs

    @property
    def answered(self) -> int:
        return self.samples - self.errors

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; non-finite floats become ``None`` (``json.dumps`` would write NaN)."""
        return jsonable(asdict(self))


def summarize(result: RunResult) -> RunReport:
    """Reduce a run's records and counters to the numbers the report shows."""
    answered = [r for r in result.records if r.error is None]
    latencies = np.array([r.latency_ms for r in answered], dtype=float)
    latency: dict[str, float | None] = dict.fromkeys([*(f"p{q}" for q in PERCENTILES), "mean", "max"])
    if latencies.size:
        latency = {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(latencies, PERCENTILES))}
        latency |= {"mean": float(latencies.mean()), "max": float(latencies.max())}
    groups: dict[tuple[int | None, str], list[RequestRecord]] = {}
    for record in answered:
        groups.setdefault((record.exit, record.node), []).append(record)
    exits = tuple(
        {"exit": exit_, "node": node, "count": len(rows), "rate": len(rows) / len(answered),
         "accuracy": _accuracy(rows)}
        for (exit_, node), rows in sorted(groups.items(), key=lambda kv: (_exit_key(kv[0][0]), kv[0][1])))
    wall = float(result.wall_s)
    order = {node: i for i, stage in enumerate(result.placement.stages) for node in stage.nodes}

    def chain(node: str) -> tuple[int, str]:  # the chain's order, unknown nodes last: how a reader follows it
        return order.get(node, len(order)), node

    nodes = Counter(r.node for r in answered)
    return RunReport(
        samples=len(result.records),
        interrupted_of=result.interrupted_of,
        errors=len(result.records) - len(answered),
        accuracy=_accuracy(answered),
        exits=exits,
        nodes={node: nodes[node] for node in sorted(nodes, key=chain)},
        latency_ms=latency,
        breakdown_ms=_mean_breakdown(answered),
        throughput=len(answered) / wall if wall > 0 else None,
        wall_s=wall,
        links={name: {"raw_bytes": c.raw_bytes, "wire_bytes": c.wire_bytes,
                      "ratio": c.raw_bytes / c.wire_bytes if c.wire_bytes else None,
                      "messages": c.messages, "rows": c.rows}
               for name, c in sorted(result.links.items(), key=lambda kv: (chain(kv[0].split("->")[0]), kv[0]))},
        placement=result.placement.describe(),
        resubmitted=sum(1 for r in result.records if r.attempts > 1),
        plan_changes=tuple({"time": change.time, "version": change.placement.version,
                            "placement": change.placement.describe(), "reason": change.reason}
                           for change in result.plan_changes),
        stage_bytes=_stage_bytes(result.stage_shipments),
    )


def _stage_bytes(shipments: list[tuple[str, str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for node, _, size in shipments:
        totals[node] = totals.get(node, 0) + size
    return totals


def write_report(report: RunReport, records: list[RequestRecord], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, four PNG plots and a self-contained ``report.html`` into ``out_dir``.

    ``records`` are the run's records (the plots need the distribution, not just the summary). Returns
    the written paths keyed ``json``, ``latency``, ``breakdown``, ``exits``, ``links`` and ``html``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                             encoding="utf-8")
    answered = [r for r in records if r.error is None]
    figures = {"latency": _latency_figure(answered), "breakdown": _breakdown_figure(answered),
               "exits": _exits_figure(report), "links": _links_figure(report)}
    pngs: dict[str, bytes] = {}
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        FigureCanvasAgg(figure).print_png(str(path))
        pngs[name] = path.read_bytes()
        paths[name] = path
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(_html(report, pngs), encoding="utf-8")
    return paths


# --- statistics -------------------------------------------------------------------------------------------


def _accuracy(records: Iterable[RequestRecord]) -> float | None:
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        return None
    return sum(r.prediction == r.label for r in labelled) / len(labelled)


def _mean_breakdown(records: list[RequestRecord]) -> dict[str, float | None]:
    """Mean of each part; a part a record lacks counts as 0 ms (that hop did not happen for it)."""
    if not records:
        return dict.fromkeys(BREAKDOWN)
    return {part: float(np.mean([r.breakdown_ms.get(part, 0.0) for r in records])) for part in BREAKDOWN}


def _exit_key(exit_: int | None) -> int:
    return -1 if exit_ is None else exit_


# --- plots ------------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A label matplotlib shows literally: a ``$`` in a node name would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


def _figure(ncols: int = 1) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _by_node(records: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    """Records grouped by answering node, nodes in the order of their first exit (the chain's order)."""
    groups: dict[str, list[RequestRecord]] = {}
    for record in sorted(records, key=lambda r: _exit_key(r.exit)):
        groups.setdefault(record.node, []).append(record)
    return groups


def _latency_figure(answered: list[RequestRecord]) -> Figure:
    figure, (hist, cdf) = _figure(2)
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
    hist.legend(fontsize="small")
    cdf.legend(fontsize="small", loc="center right")
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
    ax.legend(fontsize="small", loc="upper left")
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
    figure, (ax,) = _figure()
    ax.set_title("Bytes sent per link: before encoding (raw) and on the wire")
    if not report.links:
        _empty(ax, "no links: the whole model ran on one node")
        return figure
    names = list(report.links)
    biggest = max(max(v["raw_bytes"], v["wire_bytes"]) for v in report.links.values())
    unit, scale = next(((u, s) for u, s in BYTE_UNITS if biggest >= s), ("B", 1))
    x = np.arange(len(names))
    raw = ax.bar(x - 0.2, [report.links[n]["raw_bytes"] / scale for n in names], 0.4, label="raw",
                 color="#c44e52")
    wire = ax.bar(x + 0.2, [report.links[n]["wire_bytes"] / scale for n in names], 0.4, label="wire",
                  color="#55a868")
    ax.bar_label(raw, fmt="%.3g", fontsize="small")
    ratios = [report.links[n]["ratio"] for n in names]
    ax.bar_label(wire, [f"{b.get_height():.3g}" + ("" if r is None else f" (×{r:.2f})")
                        for b, r in zip(wire, ratios)], fontsize="small")
    ax.set_xticks(x, [_text(n) for n in names])
    ax.set(ylabel=unit, ylim=(0, max(biggest / scale, 1e-9) * 1.15))
    ax.legend(fontsize="small")
    return figure


# --- html -------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.3em; }
"""


def _fmt(value: Any, spec: str = "", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _table(header: Iterable[str], rows: Iterable[Iterable[object]], numeric_from: int = 1) -> str:
    """An HTML table; every cell escaped, columns from ``numeric_from`` right-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{html.escape(str(c))}</td>' if i >= numeric_from
                         else f"<td>{html.escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def interrupted_text(report: RunReport) -> str | None:
    """``interrupted after 40/360 inputs``, for a run stopped early; None for a whole run."""
    if report.interrupted_of is None:
        return None
    return f"interrupted after {report.samples}/{report.interrupted_of} inputs: every number covers those only"


def _interrupted_html(report: RunReport) -> str:
    text = interrupted_text(report)
    return f'<p class="warning"><strong>{html.escape(text)}</strong></p>' if text else ""


def _html(report: RunReport, pngs: dict[str, bytes]) -> str:
    summary = _table(("", "value"), [
        ("samples", report.samples), ("answered", report.answered), ("errors", report.errors),
        ("accuracy", _fmt(report.accuracy, ".2%", "no labels")),
        ("throughput", f"{_fmt(report.throughput, '.1f')} samples/s"), ("wall time", f"{report.wall_s:.3f} s"),
        ("resubmitted", report.resubmitted),
    ])
    start = report.plan_changes[0]["time"] if report.plan_changes else 0.0
    plans = _table(("at (s)", "plan", "placement", "why"), [
        (f"{c['time'] - start:.2f}", c["version"], c["placement"], c["reason"]) for c in report.plan_changes])
    shipped = _table(("node", "stage bytes shipped"), [(n, format_bytes(b)) for n, b in report.stage_bytes.items()]) \
        if report.stage_bytes else "<p>No stage files shipped: every node had its stage cached.</p>"
    exits = _table(("exit", "node", "requests", "rate", "accuracy"), [
        (_fmt(e["exit"]), e["node"], e["count"], _fmt(e["rate"], ".1%"), _fmt(e["accuracy"], ".2%"))
        for e in report.exits], numeric_from=2)
    nodes = _table(("node", "answered"), sorted(report.nodes.items()))
    latency = _table(("statistic", "ms"), [(k, _fmt(v, ".3f")) for k, v in report.latency_ms.items()])
    total = sum(v for v in report.breakdown_ms.values() if v is not None)
    breakdown = _table(("part", "mean ms", "share"), [
        (part, _fmt(v, ".3f"), _fmt(v / total if v is not None and total > 0 else None, ".1%"))
        for part, v in report.breakdown_ms.items()])
    links = _table(("link", "raw", "wire", "raw / wire", "messages", "rows"), [
        (name, format_bytes(v["raw_bytes"]), format_bytes(v["wire_bytes"]), _fmt(v["ratio"], ".2f"), v["messages"],
         v["rows"]) for name, v in report.links.items()]) \
        if report.links else "<p>No links: the whole model ran on one node.</p>"
    captions = {"latency": "Latency by answering node", "breakdown": "Latency breakdown",
                "exits": "Exits per node", "links": "Bytes per link"}
    images = "".join(
        f'<h2>{html.escape(captions[name])}</h2><img alt="{html.escape(captions[name])}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
        for name, data in pngs.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{HTML_TITLE}</title><style>{_CSS}</style></head><body>"
            f"<h1>{HTML_TITLE}</h1>{_interrupted_html(report)}"
            f"<p>Placement: <code>{html.escape(report.placement)}</code></p>"
            f"<h2>Summary</h2>{summary}<h2>Exits</h2>{exits}<h2>Answers per node</h2>{nodes}"
            f"<h2>Latency</h2>{latency}<h2>Mean breakdown</h2>{breakdown}<h2>Links</h2>{links}"
            f"<h2>Plans</h2>{plans}<h2>Stage files shipped</h2>{shipped}"
            f"{images}</body></html>\n")
