"""Benchmark: what the early-exit cascade costs and buys on the CPU, against the plain model, in one run.

Two questions, both on scikit-learn's digits with the built-in ``digits_cnn``, trained jointly with its
exits and calibrated (``max_drop=0.01``) on the calibration split, then timed on the test split:

(a) **What the cascade buys.** Throughput (samples/s) of ``net.infer(batch)`` with the calibrated policy
    against the plain model (the original ``nn.Module``, eval mode, ``torch.inference_mode``) on the same
    batches, with the accuracy and compute fraction (FLOPs over the full model's, heads included) of both.
(b) **What the cascade costs.** Every threshold set above any reachable confidence (2.0; confidences lie
    in [0, 1]; temperatures kept): the heads still run and score every sample but nobody leaves early, so any
    time above the plain model's is pure routing
    overhead. Timed at batch 1 (per-sample latency), 32 and 256 (throughput); the goal is at most 1.05x.

The box this runs on is shared and small, so absolute times are noise; only ratios taken in one run mean
anything. Hence: one process, a fixed thread count, warm-up passes, then the contenders interleaved (who
goes first rotates every round: AB, BA, ...) and every ratio is the median of the per-round paired ratios,
with its quartiles to show how much the noise moved it.

Run ``.venv/bin/python bench/cascade.py`` (``make bench``); ``--quick`` for fewer rounds, ``--json PATH``
to keep the numbers, ``--breakdown`` to split the overhead (b) into segments, heads, and routing.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset

from splitexit.config import ExitPolicy, TrainConfig
from splitexit.model.calibrate import calibrate
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.exits import EarlyExitNet
from splitexit.model.graph import run_chain
from splitexit.model.train import train
from splitexit.model.zoo import build_model

logger = logging.getLogger("bench.cascade")

MODEL = "digits_cnn"
DATASET = "digits"
SEED = 0
EPOCHS = 15
MAX_DROP = 0.01
DEFAULT_THREADS = 2
#: Batch size of the throughput comparison (a).
THROUGHPUT_BATCH = 256
#: Batch sizes of the overhead comparison (b); 1 is reported as per-sample latency.
OVERHEAD_BATCHES = (1, 32, 256)
#: The overhead (b) we aim for: cascade time over plain time, every sample at the last exit.
OVERHEAD_TARGET = 1.05


@dataclass(frozen=True)
class Repetitions:
    """How long each race runs: passes per contender and the least samples one pass holds."""

    warmup: int
    rounds: int
    pass_samples: int


FULL = Repetitions(warmup=2, rounds=15, pass_samples=512)
QUICK = Repetitions(warmup=1, rounds=5, pass_samples=256)

Runner = Callable[[torch.Tensor], object]

#: Contender names. The last two only run with --breakdown, to split the overhead (b) into its parts.
PLAIN = "plain model"
CASCADE = "net.infer"
SEGMENTS = "segments only"
SEGMENTS_AND_HEADS = "segments + heads"


@dataclass(frozen=True)
class Timing:
    """One contender in one race: its median time per pass and its time relative to the plain model."""

    median_s: float
    ratio: float  # median over rounds of (this time / the plain model's time in the same round)
    ratio_q1: float  # quartiles of those per-round ratios: how much the box's noise moved them
    ratio_q3: float


@dataclass(frozen=True)
class RaceResult:
    """Contenders timed over identical passes of batches, interleaved round by round."""

    name: str
    batch_size: int
    samples_per_pass: int
    timings: dict[str, Timing]

    def per_second(self, contender: str) -> float:
        return self.samples_per_pass / self.timings[contender].median_s

    def per_sample_us(self, contender: str) -> float:
        return self.timings[contender].median_s / self.samples_per_pass * 1e6

    @property
    def cascade_ratio(self) -> float:
        """Cascade time over plain time (below 1: the cascade is faster)."""
        return self.timings[CASCADE].ratio


@dataclass(frozen=True)
class Quality:
    """Accuracy and mean compute fraction of one contender on the whole test split."""

    accuracy: float
    compute_fraction: float
    exit_rates: tuple[float, ...]


# ---------------------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (input, label) pairs of a dataset as two tensors."""
    inputs, labels = zip(*(dataset[i] for i in range(len(dataset))))  # type: ignore[arg-type]
    return torch.stack(inputs).contiguous(), torch.as_tensor(labels)


def build_cascade(model: nn.Module, train_split: Dataset, calib_split: Dataset,
                  example: torch.Tensor) -> EarlyExitNet:
    """Attach exits to ``model`` (which shares its weights with the net), train jointly, calibrate."""
    net = EarlyExitNet.from_model(model, example)
    logger.info("exits after %s", ", ".join(c.describe() for c in net.exit_cuts))
    config = TrainConfig(mode="joint", epochs=EPOCHS, seed=SEED)
    train(net, train_split, config,
          on_epoch=lambda epoch, epochs, loss: logger.info("epoch %d/%d  loss %.4f", epoch, epochs, loss))
    report = calibrate(net, calib_split, max_drop=MAX_DROP)
    logger.info("calibrated on %d samples: accuracy %.4f (final exit %.4f), compute %.3f; thresholds %s",
                report.samples, report.accuracy, report.final_exit_accuracy, report.compute_fraction,
                [round(t, 4) for t in report.policy.thresholds])
    return net


def check_same_backbone(model: nn.Module, net: EarlyExitNet, inputs: torch.Tensor) -> None:
    """The plain contender must be the trained backbone, not an untrained copy; fail loudly if not."""
    model.eval()
    net.eval()
    with torch.inference_mode():
        plain, final = model(inputs), net(inputs)[-1]
    if not torch.allclose(plain, final, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the plain model's output differs from the net's final exit: the net no longer "
                           "shares the model's weights, so the comparison would be meaningless")


#: Above every confidence (they lie in [0, 1]) but finite: heads still run. A NEVER (infinite) threshold
#: switches its exit off entirely, which would hide the heads' cost.
UNREACHABLE = 2.0


def never_exit(policy: ExitPolicy) -> ExitPolicy:
    """The same confidence and temperatures, but no sample may leave before the last exit."""
    return ExitPolicy(confidence=policy.confidence, temperatures=policy.temperatures,
                      thresholds=(UNREACHABLE,) * len(policy.thresholds))


# ---------------------------------------------------------------------------------------------- contenders
def under_inference_mode(function: Callable[[torch.Tensor], object]) -> Runner:
    def run(batch: torch.Tensor) -> object:
        with torch.inference_mode():
            return function(batch)

    return run


def contenders(model: nn.Module, net: EarlyExitNet, *, breakdown: bool) -> dict[str, Runner]:
    """The plain model and the cascade; with ``breakdown``, also the net's segments alone (no heads) and
    ``net.forward`` (segments and every head, no scoring or routing)."""
    model.eval()
    net.eval()
    runners = {PLAIN: under_inference_mode(model), CASCADE: net.infer}
    if breakdown:
        runners[SEGMENTS] = under_inference_mode(lambda batch: run_chain(net.segments, batch))
        runners[SEGMENTS_AND_HEADS] = under_inference_mode(net)
    return runners


# ---------------------------------------------------------------------------------------------- quality
def plain_quality(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Quality:
    model.eval()
    with torch.inference_mode():
        prediction = model(inputs).argmax(dim=1)
    return Quality(float((prediction == labels).float().mean()), 1.0, ())


def cascade_quality(net: EarlyExitNet, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Quality:
    results = [net.infer(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    prediction = torch.cat([r.prediction for r in results])
    exit_at = torch.cat([r.exit for r in results])
    costs = torch.tensor(net.exit_costs(), dtype=torch.float64) / net.total_flops
    rates = torch.bincount(exit_at, minlength=net.num_exits).double() / len(exit_at)
    return Quality(float((prediction == labels).float().mean()), float(costs[exit_at].mean()),
                   tuple(float(r) for r in rates))


# ---------------------------------------------------------------------------------------------- timing
def make_pass(inputs: torch.Tensor, batch_size: int, min_samples: int, *, keep_partial: bool) -> list[torch.Tensor]:
    """Batches of the test split, cycled until one pass holds at least ``min_samples`` samples.

    ``keep_partial=False`` drops the last short batch, so every batch has exactly ``batch_size`` rows.
    """
    end = len(inputs) if keep_partial else len(inputs) - len(inputs) % batch_size
    batches = [inputs[i:i + batch_size] for i in range(0, end, batch_size)]
    if not batches:
        raise ValueError(f"the test split has {len(inputs)} samples, fewer than one batch of {batch_size}")
    per_cycle = sum(len(b) for b in batches)
    return batches * math.ceil(min_samples / per_cycle)


def time_pass(run: Runner, batches: Sequence[torch.Tensor]) -> float:
    gc.collect()
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return time.perf_counter() - start


def race(name: str, runners: dict[str, Runner], batches: Sequence[torch.Tensor], reps: Repetitions) -> RaceResult:
    """Warm every contender up, then time them in turn, rotating who goes first each round (AB, BA, ...),
    and compare each with the plain model of the same round."""
    names = list(runners)
    for _ in range(reps.warmup):
        for run in runners.values():
            time_pass(run, batches)
    times: dict[str, list[float]] = {key: [] for key in names}
    for round_index in range(reps.rounds):
        shift = round_index % len(names)
        for key in names[shift:] + names[:shift]:
            times[key].append(time_pass(runners[key], batches))
    result = RaceResult(name=name, batch_size=len(batches[0]), samples_per_pass=sum(len(b) for b in batches),
                        timings={key: summarise(times[key], times[PLAIN]) for key in names})
    logger.info("%s: cascade/plain time %.3f", name, result.cascade_ratio)
    return result


def summarise(times: Sequence[float], plain_times: Sequence[float]) -> Timing:
    ratios = [t / p for t, p in zip(times, plain_times)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    return Timing(median_s=statistics.median(times), ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3)


# ---------------------------------------------------------------------------------------------- report
def throughput_table(result: RaceResult, plain: Quality, cascade: Quality) -> Table:
    table = Table(title=f"(a) calibrated cascade vs plain model: batch {result.batch_size}, test split")
    for column in ("contender", "samples/s", "time vs plain (q1-q3)", "accuracy", "compute", "exit rates"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, quality in ((PLAIN, plain), (CASCADE, cascade)):
        timing = result.timings[name]
        table.add_row(name, f"{result.per_second(name):,.0f}", spread(timing), f"{quality.accuracy:.4f}",
                      f"{quality.compute_fraction:.3f}", "/".join(f"{r:.2f}" for r in quality.exit_rates) or "-")
    return table


def overhead_table(results: Sequence[RaceResult]) -> Table:
    table = Table(title="(b) overhead: every threshold unreachable, so every sample runs every head and the last exit")
    names = list(results[0].timings)
    table.add_column("batch", justify="right")
    table.add_column("plain model", justify="right")
    table.add_column("net.infer", justify="right")
    for name in names[1:]:
        table.add_column(f"{name} / plain (q1-q3)", justify="right")
    table.add_column(f"net.infer <= {OVERHEAD_TARGET}x", justify="right")
    for r in results:
        if r.batch_size == 1:
            speeds = [f"{r.per_sample_us(n):,.0f} us/sample" for n in (PLAIN, CASCADE)]
        else:
            speeds = [f"{r.per_second(n):,.0f} samples/s" for n in (PLAIN, CASCADE)]
        verdict = "yes" if r.cascade_ratio <= OVERHEAD_TARGET else "NO"
        table.add_row(str(r.batch_size), *speeds, *(spread(r.timings[n]) for n in names[1:]), verdict)
    return table


def spread(timing: Timing) -> str:
    return f"{timing.ratio:.3f}x ({timing.ratio_q1:.2f}-{timing.ratio_q3:.2f})"


def print_report(throughput: RaceResult, plain: Quality, cascade: Quality, overhead: Sequence[RaceResult]) -> None:
    console = Console()
    if not console.is_terminal:
        console.width = 132  # keep the tables unwrapped when the output goes to a file
    console.print(throughput_table(throughput, plain, cascade))
    console.print(overhead_table(overhead))
    console.print(f"(a) cascade/plain throughput {1 / throughput.cascade_ratio:.3f}x at compute "
                  f"{cascade.compute_fraction:.3f} of the model, "
                  f"accuracy {cascade.accuracy:.4f} vs {plain.accuracy:.4f}")
    for r in overhead:
        console.print(f"(b) batch {r.batch_size:>3}: cascade/plain time {r.cascade_ratio:.3f}x "
                      f"(target <= {OVERHEAD_TARGET}x)")


def environment() -> dict[str, object]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "revision": source_revision()}


def source_revision() -> str:
    """The commit benchmarked, with "+dirty" when src/ has uncommitted changes; "unknown" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = git(root, "rev-parse", "--short", "HEAD")
        dirty = git(root, "status", "--porcelain", "--", "src")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def race_document(result: RaceResult) -> dict[str, object]:
    return {**asdict(result), "samples_per_s": {name: result.per_second(name) for name in result.timings},
            "cascade_time_ratio": result.cascade_ratio}


def write_json(path: Path, args: argparse.Namespace, reps: Repetitions, throughput: RaceResult,
               plain: Quality, cascade: Quality, overhead: Sequence[RaceResult], load: dict[str, float]) -> None:
    document = {
        "command": " ".join([".venv/bin/python bench/cascade.py", *args.argv]),
        "environment": {**environment(), "load_average_1min": load},
        "settings": {"model": MODEL, "dataset": DATASET, "seed": SEED, "epochs": EPOCHS, "max_drop": MAX_DROP,
                     "throughput_batch": THROUGHPUT_BATCH, **asdict(reps)},
        "throughput": {**race_document(throughput), "throughput_ratio": 1 / throughput.cascade_ratio,
                       "plain": asdict(plain), "cascade": asdict(cascade)},
        "overhead": [race_document(r) for r in overhead],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", path)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer warm-up passes and rounds")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads (default 2)")
    parser.add_argument("--breakdown", action="store_true",
                        help="in (b), also time the segments alone and segments + heads, to show where time goes")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    reps = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    seed_everything(SEED)
    load = {"start": os.getloadavg()[0]}
    logger.info("torch %s, %d threads, %s, load average %.2f, revision %s", torch.__version__,
                torch.get_num_threads(), reps, load["start"], source_revision())

    splits = split_dataset(load_dataset(DATASET))
    test_inputs, test_labels = stack(splits.test)
    model = build_model(MODEL)
    net = build_cascade(model, splits.train, splits.calib, test_inputs[:1])
    check_same_backbone(model, net, test_inputs)

    plain_q = plain_quality(model, test_inputs, test_labels)
    cascade_q = cascade_quality(net, test_inputs, test_labels, THROUGHPUT_BATCH)
    throughput = race("(a) calibrated", contenders(model, net, breakdown=False),
                      make_pass(test_inputs, THROUGHPUT_BATCH, reps.pass_samples, keep_partial=True), reps)

    net.set_policy(never_exit(net.policy))
    forced = cascade_quality(net, test_inputs, test_labels, THROUGHPUT_BATCH)
    if forced.exit_rates[-1] != 1.0:
        raise RuntimeError(f"with every threshold unreachable some samples still left early: {forced.exit_rates}")
    runners = contenders(model, net, breakdown=args.breakdown)
    overhead = [race(f"(b) batch {size}", runners, make_pass(test_inputs, size, reps.pass_samples, keep_partial=False),
                     reps) for size in OVERHEAD_BATCHES]

    load["end"] = os.getloadavg()[0]
    logger.info("load average %.2f at the end on %d cores; this run alone accounts for up to %d of it",
                load["end"], os.cpu_count() or 0, torch.get_num_threads())
    print_report(throughput, plain_q, cascade_q, overhead)
    if args.json:
        write_json(args.json, args, reps, throughput, plain_q, cascade_q, overhead, load)


if __name__ == "__main__":
    main()
