"""The run summary counts what it says (hand-computed), and the written report is strict JSON plus safe HTML."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from splitexit.control.edge import RunResult
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.report.console import run_table
from splitexit.report.run_report import write_report
from splitexit.report.run_summary import RunReport, summarize
from splitexit.runtime.placement import PlacedStage, Placement
from splitexit.runtime.records import BREAKDOWN, RequestRecord
from splitexit.runtime.remote import LinkCounters


def placement(edge: str = "edge", cloud: str = "cloud1") -> Placement:
    stages = (PlacedStage(0, (edge,), MODEL_INPUT, 6), PlacedStage(1, (cloud,), 6, MODEL_OUTPUT))
    return Placement(stages=stages, version=1)


def record(index: int, *, exit_: int | None, node: str, prediction: int | None, label: int | None,
           latency: float, breakdown: dict[str, float] | None = None, error: str | None = None) -> RequestRecord:
    return RequestRecord(index, index + 1, prediction, exit_, node, None if error else 0.9, label, latency,
                         breakdown or {}, error)


def labelled_records(edge: str = "edge", cloud: str = "cloud1", labels: bool = True) -> list[RequestRecord]:
    lab = (lambda y: y) if labels else (lambda y: None)
    return [
        record(0, exit_=0, node=edge, prediction=1, label=lab(1), latency=10.0,
               breakdown={"edge_compute": 8.0, "link": 2.0}),  # other parts missing: they count as 0
        record(1, exit_=0, node=edge, prediction=2, label=lab(3), latency=20.0,
               breakdown={"edge_compute": 16.0, "queue": 4.0}),
        record(2, exit_=1, node=cloud, prediction=0, label=lab(0), latency=30.0,
               breakdown={"edge_compute": 4.0, "encode": 1.0, "link": 10.0, "queue": 3.0, "remote_compute": 10.0,
                          "decode": 2.0}),
        record(3, exit_=1, node=cloud, prediction=4, label=lab(4), latency=40.0,
               breakdown={"edge_compute": 4.0, "encode": 1.0, "link": 20.0, "queue": 1.0, "remote_compute": 12.0,
                          "decode": 2.0}),
        record(4, exit_=None, node=cloud, prediction=None, label=lab(5), latency=1000.0,
               error="UNAVAILABLE: cloud1 went away"),
    ]


def result(records: list[RequestRecord], *, edge: str = "edge", cloud: str = "cloud1") -> RunResult:
    links = {f"{cloud}->spare": LinkCounters(),
             f"{edge}->{cloud}": LinkCounters(raw_bytes=4096, wire_bytes=1024, messages=3, rows=2)}
    return RunResult(records, wall_s=2.0, links=links, placement=placement(edge, cloud))


@pytest.fixture()
def report() -> RunReport:
    return summarize(result(labelled_records()))


def test_counts_accuracy_and_exit_rates(report: RunReport) -> None:
    assert (report.samples, report.errors, report.answered) == (5, 1, 4)
    assert report.accuracy == pytest.approx(3 / 4)  # the errored row's label does not count
    assert report.exits == (
        {"exit": 0, "node": "edge", "count": 2, "rate": 0.5, "accuracy": 0.5},
        {"exit": 1, "node": "cloud1", "count": 2, "rate": 0.5, "accuracy": 1.0},
    )
    assert report.nodes == {"edge": 2, "cloud1": 2}
    assert report.throughput == pytest.approx(4 / 2.0)
    assert report.wall_s == 2.0
    assert report.placement == "edge[input..cut 6] → cloud1[cut 6..output]"


def test_latency_excludes_errors_and_uses_linear_percentiles(report: RunReport) -> None:
    # numpy's default (linear) on [10, 20, 30, 40]: position q/100 * 3
    assert report.latency_ms == pytest.approx({"p50": 25.0, "p95": 38.5, "p99": 39.7, "mean": 25.0, "max": 40.0})


def test_breakdown_means_in_breakdown_order(report: RunReport) -> None:
    assert tuple(report.breakdown_ms) == BREAKDOWN
    assert report.breakdown_ms == pytest.approx({
        "edge_compute": (8 + 16 + 4 + 4) / 4, "encode": 2 / 4, "link": (2 + 10 + 20) / 4, "queue": (4 + 3 + 1) / 4,
        "remote_compute": 22 / 4, "decode": 4 / 4})


def test_links_with_ratio_and_no_division_by_zero(report: RunReport) -> None:
    assert report.links["edge->cloud1"] == {"raw_bytes": 4096, "wire_bytes": 1024, "ratio": 4.0, "messages": 3,
                                            "rows": 2}
    assert report.links["cloud1->spare"]["ratio"] is None
    assert list(report.links) == ["edge->cloud1", "cloud1->spare"]  # the chain's order, not insertion's


def test_nodes_follow_the_chain_not_the_records() -> None:
    report = summarize(result(labelled_records()[::-1]))
    assert list(report.nodes) == ["edge", "cloud1"]


def test_without_labels_accuracy_is_none() -> None:
    report = summarize(result(labelled_records(labels=False)))
    assert report.accuracy is None
    assert all(e["accuracy"] is None for e in report.exits)
    assert report.exits[0]["count"] == 2


def test_all_errors_gives_nones_not_nan(tmp_path: Path) -> None:
    records = [r for r in labelled_records() if r.error]
    report = summarize(result(records))
    assert (report.samples, report.errors, report.exits, report.accuracy) == (1, 1, (), None)
    assert set(report.latency_ms.values()) == {None} and set(report.breakdown_ms.values()) == {None}
    assert report.throughput == 0.0
    paths = write_report(report, records, tmp_path)
    assert json.loads(paths["json"].read_text()) == report.to_dict()


def test_to_dict_is_strict_json() -> None:
    report = summarize(RunResult(labelled_records(), wall_s=0.0, links={}, placement=placement()))
    assert report.throughput is None
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert json.loads(text)["exits"][1]["node"] == "cloud1"


def test_write_report_files_round_trip_and_escape(tmp_path: Path) -> None:
    records = labelled_records(edge="<b>", cloud="cloud$1")
    report = summarize(result(records, edge="<b>", cloud="cloud$1"))
    paths = write_report(report, records, tmp_path / "out")
    assert set(paths) == {"json", "timeline", "latency", "breakdown", "exits", "links", "confusion", "html"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())

    loaded = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert loaded == report.to_dict()
    assert loaded["latency_ms"]["p95"] == pytest.approx(38.5)
    assert loaded["accuracy"] == pytest.approx(0.75)
    assert loaded["links"]["<b>->cloud$1"]["ratio"] == 4.0
    assert loaded["exits"][0]["node"] == "<b>"

    page = paths["html"].read_text(encoding="utf-8")
    assert "<title>splitexit run report</title>" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 6
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert not re.search(r"<script|(src|href)=\"(http|//)", page)  # self-contained
    assert paths["latency"].read_bytes().startswith(b"\x89PNG")


def test_run_table_renders_the_numbers() -> None:
    records = labelled_records(edge="[red]edge")
    report = summarize(result(records, edge="[red]edge"))
    console = Console(record=True, width=160)
    console.print(run_table(report))
    text = console.export_text()
    for expected in ("75.00%", "p50 25.00", "p95 38.50", "p99 39.70", "[red]edge->cloud1", "4.0 KiB", "4.00",
                     "2.0 samples/s", "remote_compute", "cloud1"):
        assert expected in text, expected
    assert "[red]edge" in text  # a node name is text, never rich markup
    assert not math.isnan(report.latency_ms["mean"] or math.nan)
