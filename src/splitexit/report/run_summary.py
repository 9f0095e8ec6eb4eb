"""What a run did, in numbers: :func:`summarize` a :class:`RunResult` into the :class:`RunReport` every view shows.

The summary is computed once, here, so that the console table, ``report.json``, ``report.html`` and the
plots can never disagree. Conventions:

* *answered* records are those without an ``error``; latency, breakdown, exits and throughput count only
  them (a failed request's latency measures how fast it failed, not how fast the system answers).
* exit ``rate`` is a share of the answered samples, so the rates of a run sum to 1; errors are counted
  separately.
* accuracy is over answered records that carry a label, and ``None`` when none does.
* every statistic of an empty population is ``None``, never NaN, so ``report.json`` is strict JSON.
* plan ids are strings (they exceed 2^53, which JSON readers such as JavaScript and jq round).
* times of plan and membership changes are ``at_s``: seconds since the run began.
* ``resubmitted`` counts requests the entry had to send more than once (a node died with them);
  ``stage_bytes`` is the stage-file bytes shipped to each node during the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from splitexit.control.coordinator import shipped_bytes
from splitexit.control.edge import RunResult
from splitexit.report.formats import jsonable
from splitexit.runtime.records import BREAKDOWN, RequestRecord

__all__ = ["MAX_CONFUSION_CLASSES", "PERCENTILES", "RunReport", "class_name", "summarize"]

#: Latency percentiles the report shows, in order.
PERCENTILES = (50, 95, 99)
#: Above this many classes the report leaves the confusion matrix out (it would not be read, and it would
#: make report.json as large as the square of the classes).
MAX_CONFUSION_CLASSES = 50


@dataclass(frozen=True)
class RunReport:
    """Summary of one run; see the module docstring for what each number counts.

    ``exits`` holds one dict per (exit, node) pair: ``exit``, ``node``, ``count``, ``rate``, ``accuracy``.
    ``links`` maps ``"edge->cloud1"`` to ``raw_bytes``, ``wire_bytes``, ``ratio`` (raw / wire; above 1
    means the codec saved bytes), ``messages`` and ``rows``. ``plans`` compares each plan's predicted
    latency with what its requests measured; ``members`` and ``edges`` are one row per node and per edge;
    ``confusion`` is ``{"classes": [...], "matrix": [[...]]}`` (rows: true label, columns: prediction).
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
    fallbacks: int = 0  # answered at the edge because the chain could not (included in the answered)
    plan_changes: tuple[dict[str, Any], ...] = ()
    stage_bytes: dict[str, int] | None = None
    interrupted_of: int | None = None  # the run was stopped after `samples` of this many inputs
    metadata: dict[str, str] | None = None
    plans: tuple[dict[str, Any], ...] = ()
    membership: tuple[dict[str, Any], ...] = ()
    members: tuple[dict[str, Any], ...] = ()
    edges: tuple[dict[str, Any], ...] = ()
    confusion: dict[str, Any] | None = None
    class_names: tuple[str, ...] = ()
    started_at: float = 0.0  # wall-clock time the run began (0: not known)

    @property
    def answered(self) -> int:
        return self.samples - self.errors

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; non-finite floats become ``None`` (``json.dumps`` would write NaN)."""
        return jsonable(asdict(self))


def summarize(result: RunResult) -> RunReport:
    """Reduce a run's records and counters to the numbers the report shows."""
    answered = [r for r in result.records if r.error is None]
    groups: dict[tuple[int | None, str], list[RequestRecord]] = {}
    for record in answered:
        groups.setdefault((record.exit, record.node), []).append(record)
    exits = tuple(
        {"exit": exit_, "node": node, "count": len(rows), "rate": len(rows) / len(answered),
         "accuracy": _accuracy(rows)}
        for (exit_, node), rows in sorted(groups.items(), key=lambda kv: (exit_key(kv[0][0]), kv[0][1])))
    wall = float(result.wall_s)
    order = {node: i for i, stage in enumerate(result.placement.stages) for node in stage.nodes}

    def chain(node: str) -> tuple[int, str]:  # the chain's order, unknown nodes last: how a reader follows it
        return order.get(node, len(order)), node

    nodes = Counter(r.node for r in answered)
    links = {name: {"raw_bytes": c.raw_bytes, "wire_bytes": c.wire_bytes,
                    "ratio": c.raw_bytes / c.wire_bytes if c.wire_bytes else None,
                    "messages": c.messages, "rows": c.rows}
             for name, c in sorted(result.links.items(), key=lambda kv: (chain(kv[0].split("->")[0]), kv[0]))}
    start = result.started_at
    latency = _latency(answered)
    throughput = len(answered) / wall if wall > 0 else None
    edge = result.placement.stages[0].nodes[0] if result.placement.stages else "edge"
    return RunReport(
        samples=len(result.records),
        interrupted_of=result.interrupted_of,
        errors=len(result.records) - len(answered),
        accuracy=_accuracy(answered),
        exits=exits,
        nodes={node: nodes[node] for node in sorted(nodes, key=chain)},
        latency_ms=latency,
        breakdown_ms=_mean_breakdown(answered),
        throughput=throughput,
        wall_s=wall,
        links=links,
        placement=result.placement.describe(),
        resubmitted=sum(1 for r in result.records if r.attempts > 1),
        fallbacks=sum(1 for r in answered if r.fallback),
        plan_changes=tuple({"at_s": change.time - start if start else 0.0, "time": change.time,
                            "plan": str(change.placement.version), "placement": change.placement.describe(),
                            "cause": change.cause, "reason": change.reason} for change in result.plan_changes),
        stage_bytes=shipped_bytes(result.stage_shipments),
        metadata=dict(result.metadata),
        plans=_plans(result),
        membership=tuple({"at_s": change.time - start if start else 0.0, "node": change.node, "event": change.event}
                         for change in result.membership),
        members=_members(result, nodes, links, sorted(set(order) | set(nodes), key=chain)),
        edges=({"edge": edge, "requests": len(result.records), "answered": len(answered),  # one edge per cluster
                "errors": len(result.records) - len(answered), "p50_ms": latency["p50"], "p95_ms": latency["p95"],
                "throughput": throughput},),
        confusion=_confusion(answered, result.class_names),
        class_names=tuple(result.class_names),
        started_at=start,
    )


def class_name(names: tuple[str, ...], label: int | None) -> str:
    """A class's name where the dataset gave names, else its index (``–`` for none)."""
    if label is None:
        return "–"
    return names[label] if 0 <= label < len(names) else str(label)


def exit_key(exit_: int | None) -> int:
    return -1 if exit_ is None else exit_


# --- statistics -------------------------------------------------------------------------------------------


def _latency(records: list[RequestRecord]) -> dict[str, float | None]:
    latencies = np.array([r.latency_ms for r in records], dtype=float)
    if not latencies.size:
        return dict.fromkeys([*(f"p{q}" for q in PERCENTILES), "mean", "max"])
    cuts = np.percentile(latencies, PERCENTILES)
    latency: dict[str, float | None] = {f"p{q}": float(v) for q, v in zip(PERCENTILES, cuts)}
    return latency | {"mean": float(latencies.mean()), "max": float(latencies.max())}


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


def _plans(result: RunResult) -> tuple[dict[str, Any], ...]:
    """Each plan the run used, in the order installed: predicted latency (planned plans) against the mean
    and p95 of the requests answered under it."""
    placements = {str(c.placement.version): c.placement for c in result.plan_changes}
    placements.setdefault(str(result.placement.version), result.placement)
    rows = []
    for plan, placement in placements.items():
        under = [r for r in result.records if r.error is None and r.plan == plan]
        latency = _latency(under)
        rows.append({"plan": plan, "placement": placement.describe(), "predicted_ms": placement.predicted_ms,
                     "measured_ms": latency["mean"], "p95_ms": latency["p95"], "requests": len(under)})
    return tuple(rows)


def _members(result: RunResult, answered: Counter[str], links: dict[str, dict[str, Any]],
             names: list[str]) -> tuple[dict[str, Any], ...]:
    """One row per node of the chain: its tier, what its exits answered, and what it sent down."""
    tiers = {node: stage.tier for stage in result.placement.stages for node in stage.nodes}
    total = sum(answered.values())
    rows = []
    for node in names:
        sent = [v for name, v in links.items() if name.split("->")[0] == node]
        rows.append({"node": node, "role": "edge" if tiers.get(node) == 0 else "worker", "tier": tiers.get(node),
                     "answered": answered[node], "share": answered[node] / total if total else None,
                     "sent_raw_bytes": sum(v["raw_bytes"] for v in sent),
                     "sent_wire_bytes": sum(v["wire_bytes"] for v in sent)})
    return tuple(rows)


def _confusion(answered: list[RequestRecord], names: tuple[str, ...]) -> dict[str, Any] | None:
    """Counts of (true label, prediction) over labelled answers; None without labels or with too many classes."""
    pairs = [(r.label, r.prediction) for r in answered if r.label is not None and r.prediction is not None]
    if not pairs:
        return None
    size = max(len(names), 1 + max(max(pair) for pair in pairs))
    if size > MAX_CONFUSION_CLASSES:
        return None
    matrix = np.zeros((size, size), dtype=int)
    for label, prediction in pairs:
        matrix[label, prediction] += 1
    return {"classes": [class_name(names, i) for i in range(size)], "matrix": matrix.tolist()}
