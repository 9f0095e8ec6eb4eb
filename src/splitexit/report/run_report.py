"""A run's report on disk: ``report.json`` (the :class:`~splitexit.report.run_summary.RunReport`), a PNG per
plot (:mod:`~splitexit.report.run_plots`) and a self-contained ``report.html`` with the plots embedded.

The page is plain HTML with inline CSS and no script; every value from the run (node names, class names,
reasons) is escaped. ``tests/system/test_report_browser.py`` loads it in a headless Chromium.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg

from splitexit.report.formats import format_bytes
from splitexit.report.run_plots import figures
from splitexit.report.run_summary import RunReport
from splitexit.runtime.records import RequestRecord

__all__ = ["interrupted_text", "write_report"]

HTML_TITLE = "splitexit run report"
#: Section captions of the plots, in page order.
CAPTIONS = {"timeline": "Latency over time", "latency": "Latency by answering node", "breakdown": "Latency breakdown",
            "exits": "Exits per node", "links": "Bytes per link", "confusion": "Confusion matrix"}


def write_report(report: RunReport, records: list[RequestRecord], out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, the PNG plots and a self-contained ``report.html`` into ``out_dir``.

    ``records`` are the run's records (the plots need the distribution, not just the summary). Returns
    the written paths keyed ``json``, ``html`` and each plot's name (``timeline``, ``latency``,
    ``breakdown``, ``exits``, ``links``, and ``confusion`` when the run had labels).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                             encoding="utf-8")
    pngs: dict[str, bytes] = {}
    for name, figure in figures(report, records).items():
        path = out_dir / f"{name}.png"
        FigureCanvasAgg(figure).print_png(str(path))
        pngs[name] = path.read_bytes()
        paths[name] = path
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(_html(report, pngs), encoding="utf-8")
    return paths


# --- html -------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; vertical-align: top; }
td.one-line { white-space: nowrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.3em; }
"""


def _fmt(value: Any, spec: str = "", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _table(header: Iterable[str], rows: Iterable[Iterable[object]], numeric_from: int = 1,
           unwrapped: tuple[int, ...] = ()) -> str:
    """An HTML table; every cell escaped, columns from ``numeric_from`` right-aligned, those in ``unwrapped``
    (placements) kept on one line."""
    def cell(i: int, value: object) -> str:
        kind = "num" if i >= numeric_from else "one-line" if i in unwrapped else "text"
        return f'<td class="{kind}">{html.escape(str(value))}</td>'

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
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
    sections = [("Run", _metadata(report)), ("Summary", _summary(report))]
    if "timeline" in pngs:
        sections.append(("Latency over time", _image("timeline", pngs["timeline"])))
    sections += [("Plans: predicted and measured", _plans(report)),
                 ("Membership changes", _membership(report)),
                 ("Edges", _edges(report)), ("Nodes", _members(report)), ("Exits", _exits(report))]
    if report.confusion is not None:
        sections.append(("Confusion matrix", _confusion(report.confusion) + _image("confusion", pngs["confusion"])))
    sections += [("Latency", _table(("statistic", "ms"), [(k, _fmt(v, ".3f")) for k, v in report.latency_ms.items()])),
                 ("Mean breakdown", _breakdown(report)), ("Links", _links(report)),
                 ("Stage files shipped", _shipped(report))]
    sections += [(CAPTIONS[name], _image(name, data)) for name, data in pngs.items()
                 if name not in ("timeline", "confusion")]
    body = "".join(f'<section><h2>{html.escape(title)}</h2>{content}</section>' for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{HTML_TITLE}</title><style>{_CSS}</style></head><body>"
            f"<h1>{HTML_TITLE}</h1>{_interrupted_html(report)}"
            f"<p>Placement: <code>{html.escape(report.placement)}</code></p>{body}</body></html>\n")


def _image(name: str, data: bytes) -> str:
    return (f'<img alt="{html.escape(CAPTIONS[name])}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')


def _metadata(report: RunReport) -> str:
    if not report.metadata:
        return "<p>No run metadata (the run did not come from <code>splitexit run</code>).</p>"
    return _table(("", "value"), sorted(report.metadata.items()), numeric_from=2)


def _summary(report: RunReport) -> str:
    return _table(("", "value"), [
        ("samples", report.samples), ("answered", report.answered), ("errors", report.errors),
        ("accuracy", _fmt(report.accuracy, ".2%", "no labels")),
        ("throughput", f"{_fmt(report.throughput, '.1f')} samples/s"), ("wall time", f"{report.wall_s:.3f} s"),
        ("resubmitted", report.resubmitted), ("answered at the edge (fallback)", report.fallbacks),
    ])


def _plans(report: RunReport) -> str:
    measured = _table(("plan", "placement", "requests", "predicted ms", "measured mean ms", "measured p95 ms"), [
        (p["plan"], p["placement"], p["requests"], _fmt(p["predicted_ms"], ".2f", "not planned"),
         _fmt(p["measured_ms"], ".2f"), _fmt(p["p95_ms"], ".2f")) for p in report.plans], numeric_from=2,
        unwrapped=(1,))
    changes = _table(("at (s)", "plan", "cause", "why"), [
        (f"{c['at_s']:.2f}", c["plan"], c["cause"], c["reason"]) for c in report.plan_changes], numeric_from=4)
    return measured + "<p>Plans installed, and why:</p>" + changes


def _membership(report: RunReport) -> str:
    if not report.membership:
        return "<p>No node joined, left or broke during the run.</p>"
    return _table(("at (s)", "node", "event"), [(f"{m['at_s']:.2f}", m["node"], m["event"])
                                                 for m in report.membership], numeric_from=3)


def _edges(report: RunReport) -> str:
    return _table(("edge", "requests", "answered", "errors", "p50 ms", "p95 ms", "answers/s"), [
        (e["edge"], e["requests"], e["answered"], e["errors"], _fmt(e["p50_ms"], ".2f"), _fmt(e["p95_ms"], ".2f"),
         _fmt(e["throughput"], ".1f")) for e in report.edges])


def _members(report: RunReport) -> str:
    return _table(("node", "role", "tier", "answered", "share", "sent (raw)", "sent (wire)"), [
        (m["node"], m["role"], _fmt(m["tier"]), m["answered"], _fmt(m["share"], ".1%"),
         format_bytes(m["sent_raw_bytes"]), format_bytes(m["sent_wire_bytes"])) for m in report.members],
        numeric_from=2)


def _exits(report: RunReport) -> str:
    return _table(("exit", "node", "requests", "rate", "accuracy"), [
        (_fmt(e["exit"]), e["node"], e["count"], _fmt(e["rate"], ".1%"), _fmt(e["accuracy"], ".2%"))
        for e in report.exits], numeric_from=2)


def _confusion(confusion: dict[str, Any]) -> str:
    classes = confusion["classes"]
    if len(classes) > 20:
        return "<p>Rows: true label; columns: prediction (too many classes for a table; see the plot).</p>"
    return "<p>Rows: true label; columns: prediction.</p>" + _table(
        ("true \\ predicted", *classes), [(name, *row) for name, row in zip(classes, confusion["matrix"])])


def _breakdown(report: RunReport) -> str:
    total = sum(v for v in report.breakdown_ms.values() if v is not None)
    return _table(("part", "mean ms", "share"), [
        (part, _fmt(v, ".3f"), _fmt(v / total if v is not None and total > 0 else None, ".1%"))
        for part, v in report.breakdown_ms.items()])


def _links(report: RunReport) -> str:
    if not report.links:
        return "<p>No links: the whole model ran on one node.</p>"
    return _table(("link", "raw", "wire", "raw / wire", "messages", "rows"), [
        (name, format_bytes(v["raw_bytes"]), format_bytes(v["wire_bytes"]), _fmt(v["ratio"], ".2f"), v["messages"],
         v["rows"]) for name, v in report.links.items()])


def _shipped(report: RunReport) -> str:
    if not report.stage_bytes:
        return "<p>No stage files shipped: every node had its stage cached.</p>"
    return _table(("node", "stage bytes shipped"), [(n, format_bytes(b)) for n, b in report.stage_bytes.items()])
