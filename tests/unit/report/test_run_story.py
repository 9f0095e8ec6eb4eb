"""The report tells a run's story: plans predicted against measured, re-plans and membership changes marked on
latency over time (named), run metadata, rows per node and per edge, a confusion matrix with class names,
string plan ids, legends outside the axes and bytes on a log axis (hand-built run, numbers computed by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from splitexit.control.coordinator import MembershipChange, PlanChange
from splitexit.control.edge import RunResult
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.report.console import run_table
from splitexit.report.run_plots import figures
from splitexit.report.run_report import write_report
from splitexit.report.run_summary import RunReport, summarize
from splitexit.runtime.placement import PlacedStage, Placement
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.remote import LinkCounters

T0 = 1_700_000_000.0
BIG = 2**62 + 1  # a plan id a float (and JavaScript) cannot hold exactly
SMALL = 12345


def placement(version: int, predicted: float | None, *, cut: int) -> Placement:
    stages = (PlacedStage(0, ("edge",), MODEL_INPUT, cut), PlacedStage(1, ("cloud1", "cloud2"), cut, MODEL_OUTPUT))
    return Placement(stages, version, predicted_ms=predicted)


def record(index: int, *, at: float, latency: float, plan: int, node: str, label: int, prediction: int,
           exit_: int = 1) -> RequestRecord:
    return RequestRecord(index, index + 1, prediction, exit_, node, 0.9, label, latency, finished=T0 + at,
                         plan=str(plan))


@pytest.fixture()
def run() -> RunResult:
    first, second = placement(BIG, 10.0, cut=3), placement(SMALL, 4.0, cut=6)
    records = [record(0, at=0.5, latency=12.0, plan=BIG, node="cloud1", label=0, prediction=0),
               record(1, at=1.0, latency=14.0, plan=BIG, node="cloud2", label=1, prediction=0),
               record(2, at=2.5, latency=5.0, plan=SMALL, node="edge", label=1, prediction=1, exit_=0),
               record(3, at=3.5, latency=3.0, plan=SMALL, node="cloud1", label=2, prediction=2)]
    return RunResult(records, wall_s=4.0, placement=second,
                     links={"edge->cloud1": LinkCounters(raw_bytes=40_000, wire_bytes=1_000, messages=3, rows=3)},
                     plan_changes=[PlanChange(T0, first, "start", "start"),
                                   PlanChange(T0 + 2.0, second, "edge->cloud1 measured 2 Mbit/s", "measured")],
                     membership=[MembershipChange(T0 + 3.0, "cloud2", "left")], started_at=T0,
                     metadata={"package": "pkg/", "model": "digits_cnn", "cluster file": "cluster.yaml"},
                     class_names=("zero", "one", "two"))


def test_each_plan_is_predicted_against_what_it_measured(run: RunResult) -> None:
    report = summarize(run)
    assert report.plans == (
        {"plan": str(BIG), "placement": run.plan_changes[0].placement.describe(), "predicted_ms": 10.0,
         "measured_ms": 13.0, "p95_ms": pytest.approx(13.9), "requests": 2},
        {"plan": str(SMALL), "placement": run.placement.describe(), "predicted_ms": 4.0,
         "measured_ms": 4.0, "p95_ms": pytest.approx(4.9), "requests": 2})
    assert [(c["at_s"], c["cause"]) for c in report.plan_changes] == [(0.0, "start"), (2.0, "measured")]
    assert report.membership == ({"at_s": 3.0, "node": "cloud2", "event": "left"},)


def test_plan_ids_are_strings_in_the_json(run: RunResult) -> None:
    loaded = json.loads(json.dumps(summarize(run).to_dict()))
    assert loaded["plan_changes"][0]["plan"] == str(BIG) and int(loaded["plans"][0]["plan"]) == BIG


def test_rows_per_node_and_per_edge(run: RunResult) -> None:
    report = summarize(run)
    assert [(m["node"], m["role"], m["tier"], m["answered"]) for m in report.members] == [
        ("edge", "edge", 0, 1), ("cloud1", "worker", 1, 2), ("cloud2", "worker", 1, 1)]
    assert report.members[0]["sent_wire_bytes"] == 1_000 and report.members[1]["sent_wire_bytes"] == 0
    (edge,) = report.edges
    assert (edge["edge"], edge["requests"], edge["answered"], edge["errors"], edge["throughput"]) == \
        ("edge", 4, 4, 0, 1.0)


def test_the_confusion_matrix_names_the_classes(run: RunResult) -> None:
    confusion = summarize(run).confusion
    assert confusion == {"classes": ["zero", "one", "two"], "matrix": [[1, 0, 0], [1, 1, 0], [0, 0, 1]]}


def test_no_labels_no_confusion_matrix(run: RunResult) -> None:
    unlabelled = [RequestRecord(r.index, r.request_id, r.prediction, r.exit, r.node, r.confidence, None,
                                r.latency_ms, finished=r.finished, plan=r.plan) for r in run.records]
    report = summarize(RunResult(unlabelled, wall_s=4.0, links={}, placement=run.placement))
    assert report.confusion is None
    assert "confusion" not in figures(report, unlabelled)


def test_the_timeline_marks_the_replan_and_the_membership_change_by_name(run: RunResult) -> None:
    report = summarize(run)
    (ax,) = [a for a in figures(report, run.records)["timeline"].axes]
    texts = [t.get_text() for t in ax.texts]
    assert "re-planned: measured" in texts and "cloud2 left" in texts
    lines = {round(float(line.get_xdata()[0]), 6) for line in ax.lines if len(set(line.get_xdata())) == 1}
    assert {2.0, 3.0} <= lines, "a vertical line at the re-plan (2 s) and at cloud2 leaving (3 s)"
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1, \
        "the legend sits right of the axes"
    labels = [t.get_text() for t in legend.get_texts()]
    assert "predicted (planner)" in labels and any(label.startswith("rolling median") for label in labels)


def test_bytes_are_on_a_log_axis(run: RunResult) -> None:
    (ax,) = figures(summarize(run), run.records)["links"].axes
    assert ax.get_yscale() == "log"


def test_the_page_has_every_section(run: RunResult, tmp_path: Path) -> None:
    report: RunReport = summarize(run)
    page = write_report(report, run.records, tmp_path)["html"].read_text(encoding="utf-8")
    for section in ("Run", "Latency over time", "Plans: predicted and measured", "Membership changes", "Edges",
                    "Nodes", "Confusion matrix"):
        assert f"<h2>{section}</h2>" in page, section
    for text in ("digits_cnn", "cluster.yaml", str(BIG), "measured", "cloud2", "left", "zero", "two"):
        assert text in page, text


def test_the_console_names_the_membership_change(run: RunResult) -> None:
    console = Console(record=True, width=160)
    console.print(run_table(summarize(run)))
    assert "+3.00 s: cloud2 left" in console.export_text()
