"""Measure what the planner needs: compute per segment and head, bytes and codec time per cut, exit outcomes.

A profile is measured once on this machine and saved as ``profile.json`` in the package directory (JSON,
never pickle). It has two parts, each with its own key, so each is reused until what it depends on changes:

* **timing** (key: the package's weights sha256, torch version, memory format and thread count, batch
  sizes, codecs, candidate cuts, repeats and this machine): per-segment latency between consecutive
  candidate cuts and per-head latency at every batch size (warm-up, then median and interquartile range
  of ``repeats`` runs), the cost of calling one segment (:attr:`MachineProfile.call_overhead`) and what
  ``Stage.run`` adds (:attr:`MachineProfile.stage_call`), how much slower the model runs in a worker
  thread woken after 1-30 ms idle (:attr:`MachineProfile.idle_factors`), and per cut and codec the wire
  bytes per sample and the encode / decode time, measured on real activations of calibration inputs.
* **exits** (key: the weights sha256, the exit policy and the data split): for every calibration sample,
  which early exits are confident and which exits answer correctly. The planner routes these samples
  exactly as :class:`~splitexit.model.stages.Stage` would for any set of active exits.

The timing stands in for every node of a cluster, scaled by the node's ``slowdown`` (which is what the
emulation does). ``splitexit profile --cluster`` also times the model *on* each node and probes each link
through the runtime (:mod:`splitexit.plan.cluster_profile`): those timings are stored under
:attr:`Profile.nodes` and win for their node (:attr:`MachineProfile.measured_on` says where figures come
from), and the links under :attr:`Profile.links`.

Candidate cuts are every cut point of the model, unless there are more than :data:`MAX_CANDIDATE_CUTS`:
then the multi-tensor cuts go first (inside residual blocks they carry more bytes than the block's end),
and if still too many, each of equal-FLOP bins keeps its cut with the fewest bytes. Exit cuts always stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx
from torch.utils.data import DataLoader, Dataset

from splitexit.errors import ConfigError, PackageError
from splitexit.model.calibrate import collect_outputs
from splitexit.model.exits import EarlyExitNet
from splitexit.model.heads import checked_scores, confidence_function
from splitexit.wire.codec import CodecSpec, decode, encode, parse_codec

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_CODECS",
    "MAX_CANDIDATE_CUTS",
    "PROFILE_FILE",
    "CodecTiming",
    "CutTransfer",
    "ExitTable",
    "HeadTiming",
    "MachineProfile",
    "MeasuredLink",
    "Profile",
    "SegmentTiming",
    "Timing",
    "calibration_inputs",
    "candidate_cuts",
    "exits_key",
    "load_profile",
    "measure_exits",
    "measure_idle_factors",
    "measure_timing",
    "save_profile",
    "timing_key",
]

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
PROFILE_FORMAT = "splitexit.profile/1"
#: Batch sizes every segment and head is timed at: 1 for latency, 8 (the default ``max_batch``) for throughput.
DEFAULT_BATCH_SIZES = (1, 8)
#: Codecs measured per cut: raw, fp16 and int8, each plain, +lz4 and +zstd.
DEFAULT_CODECS = ("raw", "raw+lz4", "raw+zstd", "fp16", "fp16+lz4", "fp16+zstd", "int8", "int8+lz4", "int8+zstd")
#: Above this many cut points the candidates are coarsened (see the module docstring).
MAX_CANDIDATE_CUTS = 40
WARMUP = 3
DEFAULT_REPEATS = 15
#: Calibration inputs whose activations are encoded per cut and codec (one message of one sample each).
CODEC_SAMPLES = 8
#: Idle times (seconds) after which a cold run of the whole model is timed, for :attr:`MachineProfile.idle_factors`.
IDLE_GAPS = (0.001, 0.003, 0.01, 0.03)
#: Rounds of idle-factor measurement: as many as fit in IDLE_BUDGET_S seconds, within these bounds. With 15
#: rounds digits_cnn's factor after 3-10 ms varied by 0.3-0.4 between back-to-back profiles; with 60, by 0.06-0.15.
IDLE_ROUNDS = (15, 60)
IDLE_BUDGET_S = 4.0
#: Calls back to back per round of idle-factor measurement (all but the first are warm samples).
WARM_RUN = 3
#: Bumped whenever how timings are measured changes, so that stored timings are measured again.
TIMING_METHOD = 5

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------ records
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
    def of(cls, samples: Sequence[float]) -> "Timing":
        q1, median, q3 = np.quantile(np.asarray(samples, dtype=np.float64), [0.25, 0.5, 0.75])
        return cls(float(median), float(q1), float(q3))

    @classmethod
    def fixed(cls, seconds: float) -> "Timing":
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
    """The model between two consecutive candidate cuts (``None``: the input / the output)."""

    start: int | None
    end: int | None
    flops: int  # per sample
    seconds: Mapping[int, Timing]  # batch size -> one call on that many rows

    def at(self, batch: int) -> float:
        return _at_batch(self.seconds, batch)


@dataclass(frozen=True)
class HeadTiming:
    """Scoring one exit: its head (none for the final exit), temperature, confidence and threshold test."""

    exit: int
    cut: int | None  # None for the final exit
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
    """What crossing a cut costs, per codec; ``cut=None`` is the model input (sent when the edge computes nothing)."""

    cut: int | None
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
    #: idle seconds before a call -> how much slower it runs than back to back (caches and cores go cold; on
    #: this project's VMs a 10 ms pause made digits_cnn 1.9x slower, ResNet-18 1.0x)
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

    def transfer(self, cut: int | None) -> CutTransfer:
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
    def from_json(cls, data: Mapping[str, object]) -> "MeasuredLink":
        bandwidth = data.get("bandwidth_bps")
        return cls(str(data["from"]), str(data["to"]), float(data["rtt_s"]),  # type: ignore[arg-type]
                   None if bandwidth is None else float(bandwidth),  # type: ignore[arg-type]
                   dict(data["key"]))  # type: ignore[call-overload]


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
    def from_json(cls, data: Mapping[str, object]) -> "Profile":
        if data.get("format") != PROFILE_FORMAT:
            raise PackageError(f"not a {PROFILE_FORMAT} file (format {data.get('format')!r}); re-run `splitexit profile`")
        exits = data["exits"]
        samples = len(exits["correct"][0]) if exits["correct"] else 0  # type: ignore[index]
        confident = np.array([_unbits(r) for r in exits["confident"]], dtype=bool).reshape(-1, samples)  # type: ignore[index]
        return cls(model=str(data["model"]), cuts=tuple(data["cuts"]), exit_cuts=tuple(data["exit_cuts"]),  # type: ignore[arg-type]
                   num_classes=int(data["num_classes"]),  # type: ignore[arg-type]
                   timing=_machine_from_json(data["timing"]),  # type: ignore[arg-type]
                   nodes={k: _machine_from_json(v) for k, v in dict(data.get("nodes") or {}).items()},  # type: ignore[arg-type]
                   links={(link.source, link.target): link
                          for link in map(MeasuredLink.from_json, data.get("links") or [])},  # type: ignore[arg-type]
                   exits=ExitTable(key=exits["key"], confident=confident,  # type: ignore[index]
                                   correct=np.array([_unbits(r) for r in exits["correct"]], dtype=bool)))  # type: ignore[index]


def _bits(row: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in row.tolist())


def _unbits(text: str) -> list[bool]:
    return [c == "1" for c in text]


def _timing_json(t: Timing) -> dict[str, float]:
    return asdict(t)


def _timings_json(timings: Mapping[int, Timing]) -> dict[str, dict[str, float]]:
    return {str(b): _timing_json(t) for b, t in sorted(timings.items())}


def _timings_from_json(data: Mapping[str, Mapping[str, float]]) -> dict[int, Timing]:
    return {int(b): Timing(**t) for b, t in data.items()}  # type: ignore[arg-type]


def _machine_json(m: MachineProfile) -> dict[str, object]:
    return {"key": dict(m.key), "measured_on": m.measured_on, "batch_sizes": list(m.batch_sizes),
            "call_overhead": _timing_json(m.call_overhead), "stage_call": _timings_json(m.stage_call),
            "idle_factors": {repr(g): f for g, f in sorted(m.idle_factors.items())},
            "segments": [{"start": s.start, "end": s.end, "flops": s.flops, "seconds": _timings_json(s.seconds)}
                         for s in m.segments],
            "heads": [{"exit": h.exit, "cut": h.cut, "seconds": _timings_json(h.seconds)} for h in m.heads],
            "transfers": [{"cut": t.cut, "raw_bytes": t.raw_bytes,
                           "codecs": {name: asdict(c) for name, c in t.codecs.items()}} for t in m.transfers]}


def _machine_from_json(data: Mapping[str, object]) -> MachineProfile:
    return MachineProfile(
        key=dict(data["key"]),  # type: ignore[call-overload]
        measured_on=str(data["measured_on"]),
        batch_sizes=tuple(data["batch_sizes"]),  # type: ignore[arg-type]
        call_overhead=Timing(**data["call_overhead"]),  # type: ignore[arg-type]
        stage_call=_timings_from_json(data["stage_call"]),  # type: ignore[arg-type]
        idle_factors={float(g): float(f) for g, f in dict(data["idle_factors"]).items()},  # type: ignore[call-overload]
        segments=tuple(SegmentTiming(s["start"], s["end"], s["flops"], _timings_from_json(s["seconds"]))
                       for s in data["segments"]),  # type: ignore[attr-defined]
        heads=tuple(HeadTiming(h["exit"], h["cut"], _timings_from_json(h["seconds"])) for h in data["heads"]),  # type: ignore[attr-defined]
        transfers=tuple(CutTransfer(t["cut"], t["raw_bytes"], {n: CodecTiming(**c) for n, c in t["codecs"].items()})
                        for t in data["transfers"]))  # type: ignore[attr-defined]


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


# ------------------------------------------------------------------------------------------ keys
def machine_name() -> str:
    """This machine as the profile key sees it: host name, CPU model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} / {cpu} / {os.cpu_count()} cores"


def timing_key(net: EarlyExitNet, cuts: Sequence[int], *, batch_sizes: Sequence[int], codecs: Sequence[str],
               repeats: int) -> dict[str, object]:
    """What the timing depends on; a stored timing with another key is measured again."""
    return {"method": TIMING_METHOD, "weights_sha256": net.weights_sha256, "torch": torch.__version__,
            "memory_format": net.cpu.memory_format, "threads": torch.get_num_threads(),
            "batch_sizes": list(batch_sizes), "codecs": list(codecs), "cuts": list(cuts), "repeats": repeats,
            "machine": machine_name()}


def exits_key(net: EarlyExitNet, split: object) -> dict[str, object]:
    """What the exit table depends on: the weights, the exit policy and the calibration split."""
    policy = hashlib.sha256(repr(net.policy.model_dump()).encode()).hexdigest()[:16]
    return {"weights_sha256": net.weights_sha256, "policy": policy, "split": repr(split)}


# ------------------------------------------------------------------------------------------ candidates
def candidate_cuts(net: EarlyExitNet, limit: int = MAX_CANDIDATE_CUTS) -> tuple[int, ...]:
    """The cuts the planner may choose from (see the module docstring); exit cuts are always among them."""
    if limit < 1:
        raise ConfigError(f"the candidate cut limit must be at least 1, got {limit}")
    points = list(net.graph.cut_points)
    exits = {c.id for c in net.exit_cuts}
    if len(points) > limit:
        points = [c for c in points if len(c.tensors) == 1 or c.id in exits]
    if len(points) > limit:
        total = max(1, net.graph.total_flops)
        bins = max(1, limit - len(exits))
        chosen: dict[int, object] = {}
        for c in points:
            if c.id in exits:
                continue
            slot = min(bins - 1, int(bins * c.flops_before / total))
            best = chosen.get(slot)
            if best is None or (c.bytes_per_sample, -c.id) <= (best.bytes_per_sample, -best.id):  # type: ignore[attr-defined]
                chosen[slot] = c
        keep = exits | {c.id for c in chosen.values()}  # type: ignore[attr-defined]
        points = [c for c in points if c.id in keep]
    return tuple(c.id for c in points)


# ------------------------------------------------------------------------------------------ measuring
def _clock_calls(call: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
    """Time ``call`` ``repeats`` times after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


def measure_idle_factors(call: Callable[[], None], *, warmup: int, gaps: Sequence[float] = IDLE_GAPS,
                         rounds: int | None = None) -> dict[float, float]:
    """How much slower ``call`` runs after each idle gap than back to back, handed to a worker thread as the
    runtime's stage executor hands it a batch.

    Each round makes ``WARM_RUN`` calls back to back (the last ones are the warm sample) and then, for
    every gap in turn (rotated per round), sleeps that long and makes one cold call. Without ``rounds``,
    as many rounds as fit in :data:`IDLE_BUDGET_S` (judged from the warm-up), within :data:`IDLE_ROUNDS`.
    Interleaving the rounds spreads a noisy second over every gap alike; the factor is the median cold time over the median
    warm time, and never falls as the gap grows (a longer pause cannot leave the caches warmer). Timing each
    call as its own hand-over to the worker, like the runtime does, matters: this is what serving sees (on
    the 2-core box, a stage slowed 8x computed 1.50x its warm time, and this measured 1.52-1.56x around the
    same pause).
    """
    order = tuple(gaps)
    warm: list[float] = []
    cold: dict[float, list[float]] = {gap: [] for gap in order}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitexit-profile") as worker:
        took = [worker.submit(_timed, call).result() for _ in range(max(1, warmup))]
        if rounds is None:
            per_round = (WARM_RUN + len(order)) * statistics.median(took) + sum(order)
            rounds = int(min(IDLE_ROUNDS[1], max(IDLE_ROUNDS[0], IDLE_BUDGET_S / per_round)))
        for turn in range(rounds):
            warm += [worker.submit(_timed, call).result() for _ in range(WARM_RUN)][1:]
            start = turn % len(order)
            for gap in order[start:] + order[:start]:
                time.sleep(gap)
                cold[gap].append(worker.submit(_timed, call).result())
    reference = statistics.median(warm)
    factors, floor = {}, 1.0
    for gap in sorted(order):
        floor = max(floor, statistics.median(cold[gap]) / reference)
        factors[gap] = floor
    return factors


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _batch(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` rows from ``inputs``, cycling if there are fewer."""
    if inputs.shape[0] >= size:
        return inputs[:size]
    reps = math.ceil(size / inputs.shape[0])
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:size]


def _empty_segment(tensors: int) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    values = [graph.placeholder(f"x{i}") for i in range(tensors)]
    graph.output(tuple(values))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def measure_timing(net: EarlyExitNet, inputs: torch.Tensor, cuts: Sequence[int], *,
                   batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, codecs: Sequence[str] = DEFAULT_CODECS,
                   repeats: int = DEFAULT_REPEATS, warmup: int = WARMUP,
                   progress: Progress | None = None) -> MachineProfile:
    """Time every segment between consecutive ``cuts``, every head and every codec per cut, on this machine.

    ``inputs`` are real samples (calibration inputs): activations at every cut come from running them
    through the net, so codecs see the values they will see in service. Threads are whatever torch is set
    to (the workflow applies the package's ``cpu.threads`` first).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"batch sizes must be positive, got {list(batch_sizes)}")
    specs = [parse_codec(c) for c in codecs]
    order = list(cuts)
    if order != sorted(set(order)):
        raise ConfigError(f"candidate cuts must be distinct and in forward order, got {order}")
    for cut in order:
        net.graph.cut(cut)
    missing = [c.id for c in net.exit_cuts if c.id not in order]
    if missing:
        raise ConfigError(f"exit cuts {missing} must be among the candidate cuts")
    net.eval()
    bounds: list[int | None] = [None, *order, None]
    flops_at = {c.id: c.flops_before for c in net.graph.cut_points}
    biggest = max(sizes[-1], CODEC_SAMPLES)
    x = net._prepare(_batch(inputs, biggest).to(net.input_dtype))
    steps = len(bounds) - 1 + net.num_exits + len(bounds) - 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, steps)

    segments: list[SegmentTiming] = []
    activations: dict[int | None, tuple[torch.Tensor, ...]] = {None: (x,)}
    output: torch.Tensor | None = None
    score = confidence_function(net.policy.confidence)
    with torch.inference_mode():
        empty, one = _empty_segment(1), x[:1]
        overhead = _clock_calls(lambda: empty(one), warmup=warmup, repeats=max(repeats, 30))
        for a, b in zip(bounds[:-1], bounds[1:]):
            segment = net.segment_between(a, b)
            values = activations[a]
            seconds = {}
            for size in sizes:
                batch = tuple(v[:size] for v in values)
                seconds[size] = _clock_calls(lambda: segment(*batch), warmup=warmup, repeats=repeats)
            result = segment(*values)
            if b is None:
                output = result  # type: ignore[assignment]
            else:
                activations[b] = tuple(result)  # type: ignore[arg-type]
            before = 0 if a is None else flops_at[a]
            after = net.graph.total_flops if b is None else flops_at[b]
            segments.append(SegmentTiming(a, b, int(after - before), seconds))
            tick(f"segment {'input' if a is None else a}..{'output' if b is None else b}")
        heads = []
        for i in range(net.num_exits):
            final = i == net.num_exits - 1
            temperature = net.policy.temperatures[i]
            threshold = math.inf if final else net.policy.thresholds[i]
            features = output if final else activations[net.exit_cuts[i].id][0]
            head = (lambda t: t) if final else net.heads[i]
            seconds = {}
            for size in sizes:
                rows = features[:size]  # type: ignore[index]
                seconds[size] = _clock_calls(
                    lambda: checked_scores(score, head(rows) / temperature) >= threshold, warmup=warmup,
                    repeats=repeats)
            heads.append(HeadTiming(i, None if final else net.exit_cuts[i].id, seconds))
            tick(f"exit {i}")
        # What Stage.run adds to its parts: the last stage (one part, the final exit) minus its segment and head.
        last = net.stage(order[-1] if order else None, None)
        stage_call = {}
        for size in sizes:
            batch = tuple(v[:size] for v in activations[last.start])
            whole = _clock_calls(lambda: last.run(batch), warmup=warmup, repeats=repeats)
            parts = segments[-1].seconds[size].median + heads[-1].seconds[size].median
            stage_call[size] = Timing(*(max(0.0, t - parts) for t in (whole.median, whole.q1, whole.q3)))
        # One request at a time, a worker idles between calls, and a call after a pause runs slower than back to
        # back: the whole model, segment by segment, timed after each pause length and compared.
        chain = [net.segment_between(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

        def run_chain() -> None:
            with torch.inference_mode():  # per thread: the worker below needs its own
                values: object = (x[:1],)
                for segment in chain:
                    values = segment(*values)  # type: ignore[misc]

        idle_factors = measure_idle_factors(run_chain, warmup=warmup)
    transfers = []
    for cut in bounds[:-1]:
        values = activations[cut]
        per_codec = {}
        for spec in specs:
            parts = [_codec_timing([v[i:i + 1].clone() for i in range(CODEC_SAMPLES)], spec) for v in values]
            per_codec[spec.name] = CodecTiming(spec.name, *(float(sum(column)) for column in zip(*parts)))
        raw = sum(int(v[0].numel() * v.element_size()) for v in values)
        transfers.append(CutTransfer(cut, raw, per_codec))
        tick(f"codecs at {'input' if cut is None else f'cut {cut}'}")
    key = timing_key(net, order, batch_sizes=sizes, codecs=[s.name for s in specs], repeats=repeats)
    return MachineProfile(key=key, measured_on=f"local {platform.node()}", batch_sizes=sizes,
                          call_overhead=overhead, stage_call=stage_call, idle_factors=idle_factors,
                          segments=tuple(segments), heads=tuple(heads),
                          transfers=tuple(transfers))


def _codec_timing(samples: Sequence[torch.Tensor], spec: CodecSpec) -> tuple[float, float, float]:
    """(mean message bytes, median encode seconds, median decode seconds) of one-row messages.

    Medians, not means: on a shared machine one preempted call among eight would otherwise dominate.
    """
    encode(samples[0], spec)  # warm-up: first calls pay for imports and allocator growth
    sizes, encodes, decodes = [], [], []
    for sample in samples:
        limit = max(1, sample.numel() * sample.element_size())
        start = time.perf_counter()
        message = encode(sample, spec)
        encoded = time.perf_counter()
        decode(message, max_bytes=limit)
        decodes.append(time.perf_counter() - encoded)
        encodes.append(encoded - start)
        sizes.append(message.ByteSize())
    return float(np.mean(sizes)), float(np.median(encodes)), float(np.median(decodes))


def measure_exits(net: EarlyExitNet, dataset: Dataset, key: Mapping[str, object]) -> ExitTable:
    """Score every exit on every sample of ``dataset`` (the calibration split) under the net's policy."""
    outputs = collect_outputs(net, dataset)
    policy = net.policy
    score = confidence_function(policy.confidence)
    with torch.inference_mode():
        confident = [(checked_scores(score, logits / policy.temperatures[i]) >= policy.thresholds[i]).numpy()
                     for i, logits in enumerate(outputs.logits[:-1])]
        correct = [(logits.argmax(1) == outputs.labels).numpy() for logits in outputs.logits]
    samples = len(outputs.labels)
    return ExitTable(key=dict(key), confident=np.array(confident, dtype=bool).reshape(-1, samples),
                     correct=np.array(correct, dtype=bool))


def calibration_inputs(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` inputs of ``dataset`` as one batch."""
    for inputs, _ in DataLoader(dataset, batch_size=count):
        return inputs
    raise ConfigError("the calibration split is empty; profiling needs real inputs")
