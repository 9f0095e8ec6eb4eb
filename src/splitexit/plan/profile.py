"""A model's profile: what the planner needs, as records, and their JSON file. No torch: reading a profile and
planning from it need neither the model nor a clock.

A profile is measured once on this machine (:mod:`splitexit.plan.measure`) and saved as ``profile.json`` in
the package directory (JSON, never pickle). It has two parts, each with its own key
(:mod:`splitexit.plan.profile_keys`), so each is reused until what it depends on changes:

* **timing**: per-segment latency between consecutive candidate cuts and per-head latency at every batch
  size (median and interquartile range of the timed runs), the cost of calling one segment
  (:attr:`MachineProfile.call_overhead`) and what ``Stage.run`` adds (:attr:`MachineProfile.stage_call`),
  how much slower the model runs in a worker thread woken after a short idle
  (:attr:`MachineProfile.idle_factors`), and per cut and codec the wire bytes per sample and the encode /
  decode time, measured on real activations of calibration inputs.
* **exits**: for every calibration sample, which early exits are confident and which exits answer
  correctly. The planner routes these samples exactly as :class:`~splitexit.model.stages.Stage` would for
  any set of active exits.

The timing stands in for every node of a cluster, scaled by the node's ``slowdown`` (which is what the
emulation does). ``splitexit profile --cluster`` also times the model *on* each node and probes each link
through the runtime (:mod:`splitexit.control.cluster_profile`): those timings are stored under
:attr:`Profile.nodes` and win for their node (:attr:`MachineProfile.measured_on` says where figures come
from), and the links under :attr:`Profile.links`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.cuts import Cut, cut_from_json
from splitexit.errors import PackageError

__all__ = [
    "PROFILE_FILE",
    "PROFILE_FORMAT",
    "CodecTiming",
    "CutTransfer",
    "ExitTable",
    "HeadTiming",
    "MachineProfile",
    "MeasuredLink",
    "Profile",
    "SegmentTiming",
    "Timing",
    "load_profile",
    "save_profile",
]

PROFILE_FILE = "profile.json"
PROFILE_FORMAT = "splitexit.profile/2"  # 2: cuts are ids, "input" or "output"

Json = Mapping[str, Any]  # a decoded JSON object: its shape is checked by reading it (see load_profile)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and quartiles of the timed runs (after warm-up)."""

    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        q1, median, q3 = np.quantile(np.asarray(samples, dtype=np.float64), [0.25, 0.5, 0.75])
        return cls(float(median), float(q1), float(q3))

    @classmethod
    def fixed(cls, seconds: float) -> Timing:
        """A timing without spread (hand-built profiles in tests and examples)."""
        return cls(seconds, seconds, seconds)


def _at_batch(timings: Mapping[int, Timing], batch: int) -> float:
    """Median seconds of one call at ``batch`` rows: piecewise linear through the measured sizes, extrapolated."""
    sizes = sorted(timings)
    if batch in timings:
        return timings[batch].median
    if len(sizes) == 1:
        return timings[sizes[0]].median * batch / sizes[0]
    low, high = (sizes[0], sizes[1]) if batch < sizes[0] else (sizes[-2], sizes[-1])
    for a, b in zip(sizes, sizes[1:]):
        if a < batch < b:
            low, high = a, b
    slope = (timings[high].median - timings[low].median) / (high - low)
    return max(0.0, timings[low].median + slope * (batch - low))


@dataclass(frozen=True)
class SegmentTiming:
    """The model between two consecutive candidate cuts (or the model's input / output)."""

    start: Cut
    end: Cut
    flops: int  # per sample
    seconds: Mapping[int, Timing]  # batch size -> one call on that many rows

    def at(self, batch: int) -> float:
        return _at_batch(self.seconds, batch)


@dataclass(frozen=True)
class HeadTiming:
    """Scoring one exit: its head (none for the final exit), temperature, confidence and threshold test."""

    exit: int
    cut: Cut  # MODEL_OUTPUT for the final exit
    seconds: Mapping[int, Timing]

    def at(self, batch: int) -> float:
        return _at_batch(self.seconds, batch)


@dataclass(frozen=True)
class CodecTiming:
    """One codec on the tensors crossing one cut, per sample (a message of one row)."""

    codec: str
    bytes: float  # serialised tensor messages, headers included
    encode_s: float
    decode_s: float


@dataclass(frozen=True)
class CutTransfer:
    """What crossing a cut costs, per codec; at ``MODEL_INPUT``: sending the input (the edge computes nothing)."""

    cut: Cut
    raw_bytes: int  # per sample, before encoding
    codecs: Mapping[str, CodecTiming]


@dataclass(frozen=True)
class MachineProfile:
    """Everything timed on one machine."""

    key: Mapping[str, object]
    measured_on: str  # "local <hostname>" (stands in for every node, scaled by slowdown) or a node's name
    batch_sizes: tuple[int, ...]
    call_overhead: Timing  # calling a segment that does nothing: paid once per part a stage runs
    stage_call: Mapping[int, Timing]  # per batch size: what Stage.run adds to its segments and heads
    #: idle seconds before a call -> how much slower it runs than back to back (caches and cores go cold)
    idle_factors: Mapping[float, float]
    segments: tuple[SegmentTiming, ...]  # len(cuts) + 1, in order
    heads: tuple[HeadTiming, ...]  # one per exit, the final one last
    transfers: tuple[CutTransfer, ...]  # the input first, then one per candidate cut

    def stage_call_at(self, batch: int) -> float:
        return _at_batch(self.stage_call, batch)

    def idle_factor(self, gap: float) -> float:
        """The slow-down of a call that follows ``gap`` idle seconds: linear in log(gap) between measured gaps."""
        if not self.idle_factors:
            return 1.0
        gaps = sorted(self.idle_factors)
        if gap <= gaps[0]:
            return self.idle_factors[gaps[0]]
        if gap >= gaps[-1]:
            return self.idle_factors[gaps[-1]]
        for low, high in zip(gaps, gaps[1:]):
            if low <= gap <= high:
                w = math.log(gap / low) / math.log(high / low)
                return self.idle_factors[low] + w * (self.idle_factors[high] - self.idle_factors[low])
        return self.idle_factors[gaps[-1]]  # unreachable

    def transfer(self, cut: Cut) -> CutTransfer:
        for transfer in self.transfers:
            if transfer.cut == cut:
                return transfer
        raise KeyError(cut)


@dataclass(frozen=True)
class ExitTable:
    """Per calibration sample: which early exits are confident (score >= threshold) and which exits are right.

    ``confident`` has one row per early exit, ``correct`` one per exit with the final exit last. An exit
    whose threshold is ``inf`` (never fires) is never confident.
    """

    key: Mapping[str, object]
    confident: np.ndarray  # bool (early exits, samples)
    correct: np.ndarray  # bool (exits, samples)

    @property
    def samples(self) -> int:
        return int(self.correct.shape[1])

    @property
    def early_exits(self) -> int:
        return int(self.confident.shape[0])

    def usable(self) -> tuple[int, ...]:
        """Early exits that can fire at all (a finite threshold and at least one confident sample)."""
        return tuple(i for i in range(self.early_exits) if bool(self.confident[i].any()))

    def route(self, active: Iterable[int]) -> np.ndarray:
        """The exit each sample leaves at when only ``active`` early exits are evaluated (the final one always)."""
        leave = np.full(self.samples, self.early_exits, dtype=np.int64)
        for exit_index in sorted(set(active), reverse=True):
            leave = np.where(self.confident[exit_index], exit_index, leave)
        return leave

    def exit_rates(self, active: Iterable[int]) -> tuple[float, ...]:
        leave = self.route(active)
        return tuple(float(np.mean(leave == i)) for i in range(self.early_exits + 1))

    def accuracy(self, active: Iterable[int]) -> float:
        leave = self.route(active)
        return float(self.correct[leave, np.arange(self.samples)].mean())


@dataclass(frozen=True)
class MeasuredLink:
    """A link probed through the runtime: round trip and bits per second (None: too fast to tell)."""

    source: str
    target: str
    rtt: float
    bandwidth: float | None
    key: Mapping[str, object]  # what the figures depend on: both ends' addresses, the file's figures for the link

    def to_json(self) -> dict[str, object]:
        return {"from": self.source, "to": self.target, "rtt_s": self.rtt, "bandwidth_bps": self.bandwidth,
                "key": dict(self.key)}

    @classmethod
    def from_json(cls, data: Json) -> MeasuredLink:
        bandwidth = data.get("bandwidth_bps")
        return cls(str(data["from"]), str(data["to"]), float(data["rtt_s"]),
                   None if bandwidth is None else float(bandwidth), dict(data["key"]))


@dataclass(frozen=True)
class Profile:
    """A model's profile: candidate cuts, the timing of this machine (and of nodes), exit outcomes, links."""

    model: str
    cuts: tuple[int, ...]  # candidate cut ids in forward order (exit cuts included)
    exit_cuts: tuple[int, ...]  # cut id of each early exit
    num_classes: int
    timing: MachineProfile
    exits: ExitTable
    nodes: Mapping[str, MachineProfile] = field(default_factory=dict)  # measured on that node; wins for it
    links: Mapping[tuple[str, str], MeasuredLink] = field(default_factory=dict)  # (from, to) node names

    def machine(self, node: str | None = None) -> MachineProfile:
        """The timing for ``node``: its own if one was measured there, else this machine's."""
        return self.nodes.get(node, self.timing) if node is not None else self.timing

    def to_json(self) -> dict[str, object]:
        return {"format": PROFILE_FORMAT, "model": self.model, "cuts": list(self.cuts),
                "exit_cuts": list(self.exit_cuts), "num_classes": self.num_classes,
                "timing": _machine_json(self.timing),
                "nodes": {name: _machine_json(m) for name, m in self.nodes.items()},
                "links": [link.to_json() for link in self.links.values()],
                "exits": {"key": dict(self.exits.key), "confident": [_bits(r) for r in self.exits.confident],
                          "correct": [_bits(r) for r in self.exits.correct]}}

    @classmethod
    def from_json(cls, data: Json) -> Profile:
        if data.get("format") != PROFILE_FORMAT:
            raise PackageError(f"not a {PROFILE_FORMAT} file (format {data.get('format')!r}); "
                               "re-run `splitexit profile`")
        exits = data["exits"]
        samples = len(exits["correct"][0]) if exits["correct"] else 0
        confident = np.array([_unbits(r) for r in exits["confident"]], dtype=bool).reshape(-1, samples)
        return cls(model=str(data["model"]), cuts=tuple(data["cuts"]), exit_cuts=tuple(data["exit_cuts"]),
                   num_classes=int(data["num_classes"]),
                   timing=_machine_from_json(data["timing"]),
                   nodes={k: _machine_from_json(v) for k, v in dict(data.get("nodes") or {}).items()},
                   links={(link.source, link.target): link
                          for link in map(MeasuredLink.from_json, data.get("links") or [])},
                   exits=ExitTable(key=exits["key"], confident=confident,
                                   correct=np.array([_unbits(r) for r in exits["correct"]], dtype=bool)))


def _bits(row: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in row.tolist())


def _unbits(text: str) -> list[bool]:
    return [c == "1" for c in text]


def _timing_json(t: Timing) -> dict[str, float]:
    return asdict(t)


def _timings_json(timings: Mapping[int, Timing]) -> dict[str, dict[str, float]]:
    return {str(b): _timing_json(t) for b, t in sorted(timings.items())}


def _timings_from_json(data: Json) -> dict[int, Timing]:
    return {int(b): Timing(**t) for b, t in data.items()}


def _machine_json(m: MachineProfile) -> dict[str, object]:
    return {"key": dict(m.key), "measured_on": m.measured_on, "batch_sizes": list(m.batch_sizes),
            "call_overhead": _timing_json(m.call_overhead), "stage_call": _timings_json(m.stage_call),
            "idle_factors": {repr(g): f for g, f in sorted(m.idle_factors.items())},
            "segments": [{"start": s.start, "end": s.end, "flops": s.flops, "seconds": _timings_json(s.seconds)}
                         for s in m.segments],
            "heads": [{"exit": h.exit, "cut": h.cut, "seconds": _timings_json(h.seconds)} for h in m.heads],
            "transfers": [{"cut": t.cut, "raw_bytes": t.raw_bytes,
                           "codecs": {name: asdict(c) for name, c in t.codecs.items()}} for t in m.transfers]}


def _machine_from_json(data: Json) -> MachineProfile:
    return MachineProfile(
        key=dict(data["key"]),
        measured_on=str(data["measured_on"]),
        batch_sizes=tuple(data["batch_sizes"]),
        call_overhead=Timing(**data["call_overhead"]),
        stage_call=_timings_from_json(data["stage_call"]),
        idle_factors={float(g): float(f) for g, f in dict(data["idle_factors"]).items()},
        segments=tuple(SegmentTiming(cut_from_json(s["start"]), cut_from_json(s["end"]), s["flops"],
                                     _timings_from_json(s["seconds"])) for s in data["segments"]),
        heads=tuple(HeadTiming(h["exit"], cut_from_json(h["cut"]), _timings_from_json(h["seconds"]))
                    for h in data["heads"]),
        transfers=tuple(CutTransfer(cut_from_json(t["cut"]), t["raw_bytes"],
                                    {n: CodecTiming(**c) for n, c in t["codecs"].items()}) for t in data["transfers"]))


# ------------------------------------------------------------------------------------------ files
def save_profile(profile: Profile, path: Path) -> Path:
    """Write ``profile`` as JSON (atomically: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1, allow_nan=False))
    os.replace(tmp, path)
    return path


def load_profile(path: Path) -> Profile:
    """Read a profile written by :func:`save_profile`; a missing or unreadable file is a :class:`PackageError`."""
    if not path.is_file():
        raise PackageError(f"no profile at {path}; run `splitexit profile {path.parent}` first")
    try:
        return Profile.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PackageError(f"{path} is not a readable profile ({type(exc).__name__}: {exc}); "
                           f"re-measure it with `splitexit profile {path.parent} --force`") from exc

