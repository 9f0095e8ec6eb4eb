"""Measure a profile on this machine: compute per segment and head, bytes and codec time per cut, how much
slower a worker runs after idling, and the exit outcomes of the calibration split. Runs torch and clocks:
the records it fills are in :mod:`splitexit.plan.profile`.

Timings are medians and quartiles of ``repeats`` runs after a warm-up. Activations at every cut come from
running real calibration inputs through the net, so codecs see the values they will see in service.
"""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np
import torch
import torch.fx
from torch.utils.data import DataLoader, Dataset

from splitexit.config.codec_names import CodecSpec, parse_codec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Boundary, Cut, cut_label
from splitexit.errors import ConfigError
from splitexit.model.calibrate import collect_outputs
from splitexit.model.exits import EarlyExitNet
from splitexit.model.heads import checked_scores, confidence_function
from splitexit.plan.profile import (
    CodecTiming,
    CutTransfer,
    ExitTable,
    HeadTiming,
    MachineProfile,
    SegmentTiming,
    Timing,
)
from splitexit.plan.profile_keys import timing_key
from splitexit.wire.codec_auto import time_codec

__all__ = [
    "CODEC_SAMPLES",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_CODECS",
    "DEFAULT_REPEATS",
    "WARMUP",
    "Progress",
    "calibration_inputs",
    "measure_exits",
    "measure_idle_factors",
    "measure_timing",
]

#: Batch sizes every segment and head is timed at: 1 for latency, 8 (the default ``max_batch``) for throughput.
DEFAULT_BATCH_SIZES = (1, 8)
#: Codecs measured per cut: raw, fp16 and int8, each plain, +lz4 and +zstd.
DEFAULT_CODECS = ("raw", "raw+lz4", "raw+zstd", "fp16", "fp16+lz4", "fp16+zstd", "int8", "int8+lz4", "int8+zstd")
#: Untimed calls before each timing.
WARMUP = 3
#: Timed calls per segment, head and stage call.
DEFAULT_REPEATS = 15
#: Timed calls of an empty segment (the call overhead is small and noisy: more runs than ``repeats``).
MIN_OVERHEAD_REPEATS = 30
#: Calibration inputs whose activations are encoded per cut and codec (one message of one sample each).
CODEC_SAMPLES = 8
#: Idle times (seconds) after which a cold run of the whole model is timed, for :attr:`MachineProfile.idle_factors`.
IDLE_GAPS = (0.001, 0.003, 0.01, 0.03)
#: Rounds of idle-factor measurement: as many as fit in IDLE_BUDGET_S seconds, within these bounds (fewer
#: rounds leave the factors noisy from one profile to the next).
IDLE_ROUNDS = (15, 60)
IDLE_BUDGET_S = 4.0
#: Calls back to back per round of idle-factor measurement (all but the first are warm samples).
WARM_RUN = 3

Progress = Callable[[str, int, int], None]  # (what, steps done, steps in all)


class Device(Protocol):
    """Where timed calls run (``runtime/devices.py`` ``ComputeDevice``): each call runs under ``autocast()``
    and is timed up to ``synchronize()`` (a GPU runs its kernels after the call returns)."""

    def autocast(self) -> AbstractContextManager[None]: ...

    def synchronize(self) -> None: ...


class _Here:
    """The CPU in fp32: nothing to wait for."""

    def autocast(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        return None


HERE: Device = _Here()


def _on(device: Device, call: Callable[..., object]) -> Callable[..., None]:
    """``call`` run on ``device``, returning once the device is done with it."""
    def run(*args: object) -> None:
        with device.autocast():
            call(*args)
        device.synchronize()
    return run


def _clock_calls(call: Callable[..., object], *args: object, warmup: int, repeats: int) -> Timing:
    """Time ``call(*args)`` ``repeats`` times after ``warmup`` calls."""
    for _ in range(warmup):
        call(*args)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args)
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


def measure_idle_factors(call: Callable[[], None], *, warmup: int, gaps: Sequence[float] = IDLE_GAPS,
                         rounds: int | None = None) -> dict[float, float]:
    """How much slower ``call`` runs after each idle gap than back to back, handed to a worker thread as the
    runtime's stage executor hands it a batch.

    Each round makes ``WARM_RUN`` calls back to back (the last ones are the warm sample) and then, for
    every gap in turn (rotated per round), sleeps that long and makes one cold call. Without ``rounds``,
    as many rounds as fit in :data:`IDLE_BUDGET_S` (judged from the warm-up), within :data:`IDLE_ROUNDS`.
    Interleaving the rounds spreads a noisy second over every gap alike; the factor is the median cold time
    over the median warm time, and never falls as the gap grows (a longer pause cannot leave the caches
    warmer). Each call is its own hand-over to the worker, as in the runtime: that is what serving sees.
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
                   progress: Progress | None = None, device: Device = HERE) -> MachineProfile:
    """Time every segment between consecutive ``cuts``, every head and every codec per cut, on this machine.

    ``inputs`` are real samples (calibration inputs): activations at every cut come from running them
    through the net, so codecs see the values they will see in service. Threads are whatever torch is set
    to (the workflow applies the package's ``cpu.threads`` first). On another ``device`` the net and
    ``inputs`` must be there already; every call is timed there, in its dtype.
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
    bounds: list[Cut] = [MODEL_INPUT, *order, MODEL_OUTPUT]
    x = net._prepare(_batch(inputs, max(sizes[-1], CODEC_SAMPLES)).to(net.input_dtype))
    steps = len(bounds) - 1 + net.num_exits + len(bounds) - 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, steps)

    def clock(call: Callable[..., object], *args: object) -> Timing:
        return _clock_calls(_on(device, call), *args, warmup=warmup, repeats=repeats)

    with torch.inference_mode():
        empty = _empty_segment(1)
        overhead = _clock_calls(_on(device, empty), x[:1], warmup=warmup,
                                repeats=max(repeats, MIN_OVERHEAD_REPEATS))
        segments, activations, output = _time_segments(net, bounds, x, sizes, clock, tick)
        heads = _time_heads(net, activations, output, sizes, clock, tick)
        # What Stage.run adds to its parts: the last stage (one part, the final exit) minus its segment and head.
        last = net.stage(order[-1] if order else MODEL_INPUT, MODEL_OUTPUT)
        stage_call = {}
        for size in sizes:
            whole = clock(last.run, tuple(v[:size] for v in activations[last.start]))
            parts = segments[-1].seconds[size].median + heads[-1].seconds[size].median
            stage_call[size] = Timing(*(max(0.0, t - parts) for t in (whole.median, whole.q1, whole.q3)))
        # One request at a time, a worker idles between calls, and a call after a pause runs slower than back to
        # back: the whole model, segment by segment, timed after each pause length and compared.
        idle_factors = measure_idle_factors(_on(device, _whole_model(net, bounds, x[:1])), warmup=warmup)
    transfers = []
    for crossing in bounds[:-1]:
        transfers.append(_cut_transfer(crossing, activations[crossing], specs))
        tick(f"codecs at {cut_label(crossing)}")
    key = timing_key(net, order, batch_sizes=sizes, codecs=[s.name for s in specs], repeats=repeats)
    return MachineProfile(key=key, measured_on=f"local {platform.node()}", batch_sizes=sizes,
                          call_overhead=overhead, stage_call=stage_call, idle_factors=idle_factors,
                          segments=tuple(segments), heads=tuple(heads),
                          transfers=tuple(transfers))


Clock = Callable[..., Timing]  # (call, *args) -> its timing
Activations = dict[Cut, tuple[torch.Tensor, ...]]  # cut -> the tensors crossing it


def _time_segments(net: EarlyExitNet, bounds: Sequence[Cut], x: torch.Tensor, sizes: Sequence[int],
                   clock: Clock, tick: Callable[[str], None]) -> tuple[list[SegmentTiming], Activations, torch.Tensor]:
    """Every segment between consecutive bounds, at every batch size; the activations at every cut, and the
    model's output, for what follows."""
    flops_at = {c.id: c.flops_before for c in net.graph.cut_points}
    segments: list[SegmentTiming] = []
    activations: Activations = {MODEL_INPUT: (x,)}
    output = x
    for a, b in zip(bounds[:-1], bounds[1:]):
        segment = net.segment_between(a, b)
        values = activations[a]
        seconds = {size: clock(segment, *(v[:size] for v in values)) for size in sizes}
        result = segment(*values)
        if b is MODEL_OUTPUT:
            output = result
        else:
            activations[b] = tuple(result)
        before = 0 if isinstance(a, Boundary) else flops_at[a]
        after = flops_at[b] if isinstance(b, int) else net.graph.total_flops
        segments.append(SegmentTiming(a, b, int(after - before), seconds))
        tick(f"segment {cut_label(a, compact=True)}..{cut_label(b, compact=True)}")
    return segments, activations, output


def _time_heads(net: EarlyExitNet, activations: Activations, output: torch.Tensor, sizes: Sequence[int],
                clock: Clock, tick: Callable[[str], None]) -> list[HeadTiming]:
    """Scoring every exit as a stage does: head (none for the final exit), temperature, confidence, threshold."""
    score = confidence_function(net.policy.confidence)
    heads = []
    for i in range(net.num_exits):
        final = i == net.num_exits - 1
        features = output if final else activations[net.exit_cuts[i].id][0]
        head: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t) if final else net.heads[i]
        threshold = math.inf if final else net.policy.thresholds[i]
        scored = _scorer(score, head, net.policy.temperatures[i], threshold)
        heads.append(HeadTiming(i, MODEL_OUTPUT if final else net.exit_cuts[i].id,
                                {size: clock(scored, features[:size]) for size in sizes}))
        tick(f"exit {i}")
    return heads


def _scorer(score: Callable[[torch.Tensor], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
            temperature: float, threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def scored(rows: torch.Tensor) -> torch.Tensor:
        return checked_scores(score, head(rows) / temperature) >= threshold
    return scored


def _whole_model(net: EarlyExitNet, bounds: Sequence[Cut], x: torch.Tensor) -> Callable[[], None]:
    """A call that runs the whole model on ``x`` segment by segment, in whichever thread calls it."""
    chain = [net.segment_between(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def run() -> None:
        with torch.inference_mode():  # per thread: the worker that runs this needs its own
            values: tuple[torch.Tensor, ...] = (x,)
            for segment in chain:
                result = segment(*values)
                values = (result,) if isinstance(result, torch.Tensor) else tuple(result)

    return run


def _cut_transfer(cut: Cut, values: Sequence[torch.Tensor], specs: Sequence[CodecSpec]) -> CutTransfer:
    """Every codec on the tensors crossing ``cut``: one message per tensor and sample, summed over the tensors."""
    per_codec = {}
    for spec in specs:
        parts = [_codec_timing([v[i:i + 1].clone() for i in range(CODEC_SAMPLES)], spec) for v in values]
        per_codec[spec.name] = CodecTiming(spec.name, *(float(sum(column)) for column in zip(*parts)))
    raw = sum(int(v[0].numel() * v.element_size()) for v in values)
    return CutTransfer(cut, raw, per_codec)


def _codec_timing(samples: Sequence[torch.Tensor], spec: CodecSpec) -> tuple[float, float, float]:
    """(mean message bytes, median encode seconds, median decode seconds) of one-row messages.

    Medians, not means: on a shared machine one preempted call among eight would otherwise dominate.
    """
    times = time_codec(samples, spec, warmup=True)
    return float(np.mean(times.bytes)), float(np.median(times.encode_s)), float(np.median(times.decode_s))


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
