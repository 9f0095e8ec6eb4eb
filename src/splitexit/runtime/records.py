"""One input's outcome as the edge reports it, and how a request's latency splits by its trace."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitexit.runtime.hop import RowError, RowResult, Stamp

__all__ = ["BREAKDOWN", "RequestRecord", "request_record"]

#: Parts of a request's latency, in the order the report shows them.
BREAKDOWN = ("edge_compute", "encode", "link", "queue", "remote_compute", "decode")


@dataclass(frozen=True)
class RequestRecord:
    """One input's outcome, as `splitexit run --out` writes it."""

    index: int
    request_id: int
    prediction: int | None
    exit: int | None
    node: str
    confidence: float | None
    label: int | None
    latency_ms: float
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    finished: float = 0.0  # wall-clock time the answer arrived
    plan: str = ""  # id of the plan the last attempt was sent under (a string: ids exceed 2^53)
    fallback: bool = False  # answered at the edge because the chain could not (cluster file's `fallback`)
    fallback_reason: str | None = None  # why: the chain's failure


def request_record(outcome: RowResult | RowError, *, index: int, label: int | None, started: float,
                   finished: float, attempts: int, plan: int = 0, fallback: str | None = None) -> RequestRecord:
    latency_ms = (finished - started) * 1e3
    plan_id = str(plan) if plan else ""
    if isinstance(outcome, RowError):
        return RequestRecord(index, outcome.request_id, None, None, outcome.node, None, label, latency_ms,
                             error=f"{outcome.code}: {outcome.message}", attempts=attempts, finished=finished,
                             plan=plan_id)
    return RequestRecord(index, outcome.request_id, outcome.prediction, outcome.exit, outcome.node,
                         outcome.confidence, label, latency_ms, _breakdown(outcome.trace, latency_ms),
                         attempts=attempts, finished=finished, plan=plan_id, fallback=fallback is not None,
                         fallback_reason=fallback)


def _breakdown(trace: list[Stamp], latency_ms: float) -> dict[str, float]:
    """Split a request's latency by its trace: compute, queue, encode, decode per node; the rest is link."""
    first: dict[tuple[str, str], float] = {}
    for node, event, t in trace:
        first.setdefault((node, event), t)
    nodes = list(dict.fromkeys(node for node, _, _ in trace))
    parts = dict.fromkeys(BREAKDOWN, 0.0)
    for i, node in enumerate(nodes):
        compute = "edge_compute" if i == 0 else "remote_compute"
        parts[compute] += _span(first, node, "compute_start", "compute_end") * 1e3
        parts["queue"] += _span(first, node, "queued", "compute_start") * 1e3
        parts["encode"] += _span(first, node, "compute_end", "encoded") * 1e3
        parts["decode"] += _span(first, node, "received", "decoded") * 1e3
    parts["link"] = max(0.0, latency_ms - sum(v for k, v in parts.items() if k != "link"))
    return {k: round(v, 4) for k, v in parts.items()}


def _span(first: dict[tuple[str, str], float], node: str, a: str, b: str) -> float:
    """Seconds from ``node``'s first ``a`` stamp to its first ``b`` stamp (0 when either is missing)."""
    return max(0.0, first[(node, b)] - first[(node, a)]) if (node, a) in first and (node, b) in first else 0.0
