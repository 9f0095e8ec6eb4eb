"""Benchmark: what the early-exit cascade costs and buys on the CPU, against the plain model, in one run.

Two questions, both on scikit-learn's digits with the built-in ``digits_cnn``, trained jointly with its
exits and calibrated (``max_drop=0.01``) on the calibration split, then timed on the test split:

(a) **What the cascade buys.** Throughput (samples/s) of ``net.infer(batch)`` with the calibrated policy
    against the plain model (the original ``nn.Module``, eval mode, ``torch.inference_mode``) on the same
    batches, with the accuracy and compute fraction (FLOPs over the full model's, heads included) of both.
(b) **What the cascade costs.** Every threshold set to ``NEVER`` (temperatures kept): the heads still run
    and score every sample but nobody leaves early, so any time above the plain model's is pure routing
    overhead. Timed at batch 1 (per-sample latency), 32 and 256 (throughput); the goal is at most 1.05x.

The box this runs on is shared and small, so absolute times are noise; only ratios taken in one run mean
anything. Hence: one process, a fixed thread count, warm-up passes, then the two contenders interleaved
(the order flips every round, ABBA...) and every ratio is the median of the per-round paired ratios.

Run ``python bench/cascade.py`` (``make bench``); ``--quick`` for fewer rounds, ``--json PATH`` to keep
the numbers.
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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset

from splitexit.config import NEVER, ExitPolicy, TrainConfig
from splitexit.model.calibrate import calibrate
from splitexit.model.data import load_dataset, split_dataset
from splitexit.model.exits import EarlyExitNet
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


FULL = Repetitions(warmup=3, rounds=15, pass_samples=1024)
QUICK = Repetitions(warmup=1, rounds=5, pass_samples=256)

Runner = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class RaceResult:
    """Median timings of one plain-vs-cascade race over identical passes."""

    name: str
    batch_size: int
    samples_per_pass: int
    plain_s: float  # median seconds per pass
    cascade_s: float
    time_ratio: float  # median over rounds of cascade time / plain time (paired within a round)
    ratio_q1: float  # spread of the per-round ratios
    ratio_q3: float

    @property
    def plain_per_s(self) -> float:
        return self.samples_per_pass / self.plain_s

    @property
    def cascade_per_s(self) -> float:
        return self.samples_per_pass / self.cascade_s


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


def never_exit(policy: ExitPolicy) -> ExitPolicy:
    """The same confidence and temperatures, but no sample may leave before the last exit."""
    return ExitPolicy(confidence=policy.confidence, temperatures=policy.temperatures,
                      thresholds=(NEVER,) * len(policy.thresholds))


# ---------------------------------------------------------------------------------------------- contenders
def plain_runner(model: nn.Module) -> Runner:
    model.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(batch)

    return run


def cascade_runner(net: EarlyExitNet) -> Runner:
    return net.infer


# ---------------------------------------------------------------------------------------------- quality
def plain_quality(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Quality:
    with torch.inference_mode():
        prediction = plain_runner(model)(inputs).argmax(dim=1)  # type: ignore[union-attr]
    return Quality(float((prediction == labels).float().mean()), 1.0, (1.0,))


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


def race(name: str, plain: Runner, cascade: Runner, batches: Sequence[torch.Tensor],
         reps: Repetitions) -> RaceResult:
    """Warm both up, then alternate them (ABBA...) and keep the medians and the paired ratios."""
    contenders = {"plain": plain, "cascade": cascade}
    for _ in range(reps.warmup):
        for run in contenders.values():
            time_pass(run, batches)
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for round_index in range(reps.rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for key in order:
            times[key].append(time_pass(contenders[key], batches))
    ratios = [c / p for c, p in zip(times["cascade"], times["plain"])]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    result = RaceResult(name=name, batch_size=len(batches[0]), samples_per_pass=sum(len(b) for b in batches),
                        plain_s=statistics.median(times["plain"]), cascade_s=statistics.median(times["cascade"]),
                        time_ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3)
    logger.info("%s: cascade/plain time %.3f (q1 %.3f, q3 %.3f)", name, result.time_ratio, q1, q3)
    return result


# ---------------------------------------------------------------------------------------------- report
def throughput_table(result: RaceResult, plain: Quality, cascade: Quality) -> Table:
    table = Table(title=f"(a) calibrated cascade vs plain model, batch {result.batch_size}, test split")
    for column in ("contender", "samples/s", "accuracy", "compute fraction", "exit rates"):
        table.add_column(column, justify="right" if column != "contender" else "left")
    table.add_row("plain model", f"{result.plain_per_s:,.0f}", f"{plain.accuracy:.4f}",
                  f"{plain.compute_fraction:.3f}", "-")
    table.add_row("cascade (net.infer)", f"{result.cascade_per_s:,.0f}", f"{cascade.accuracy:.4f}",
                  f"{cascade.compute_fraction:.3f}", " / ".join(f"{r:.2f}" for r in cascade.exit_rates))
    return table


def overhead_table(results: Sequence[RaceResult]) -> Table:
    table = Table(title="(b) overhead: every threshold NEVER, all samples reach the last exit")
    for column in ("batch", "plain", "cascade", "time ratio", "q1-q3", f"<= {OVERHEAD_TARGET}"):
        table.add_column(column, justify="right")
    for r in results:
        if r.batch_size == 1:
            plain, cascade = f"{r.plain_s / r.samples_per_pass * 1e6:.0f} us/sample", \
                f"{r.cascade_s / r.samples_per_pass * 1e6:.0f} us/sample"
        else:
            plain, cascade = f"{r.plain_per_s:,.0f} samples/s", f"{r.cascade_per_s:,.0f} samples/s"
        table.add_row(str(r.batch_size), plain, cascade, f"{r.time_ratio:.3f}x",
                      f"{r.ratio_q1:.3f}-{r.ratio_q3:.3f}", "yes" if r.time_ratio <= OVERHEAD_TARGET else "NO")
    return table


def print_report(console: Console, throughput: RaceResult, plain: Quality, cascade: Quality,
                 overhead: Sequence[RaceResult]) -> None:
    console.print(throughput_table(throughput, plain, cascade))
    console.print(overhead_table(overhead))
    console.print(f"(a) cascade/plain throughput: {1 / throughput.time_ratio:.3f}x "
                  f"(compute {cascade.compute_fraction:.3f} vs 1.000, accuracy {cascade.accuracy:.4f} vs "
                  f"{plain.accuracy:.4f})")
    for r in overhead:
        console.print(f"(b) batch {r.batch_size:>3}: cascade/plain time {r.time_ratio:.3f}x "
                      f"(target <= {OVERHEAD_TARGET})")


def environment(threads: int) -> dict[str, object]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or "unknown", "cpu_count": os.cpu_count(),
            "threads": threads}


def write_json(path: Path, args: argparse.Namespace, reps: Repetitions, throughput: RaceResult,
               plain: Quality, cascade: Quality, overhead: Sequence[RaceResult]) -> None:
    document = {
        "command": " ".join([".venv/bin/python bench/cascade.py", *args.argv]),
        "environment": environment(torch.get_num_threads()),
        "settings": {"model": MODEL, "dataset": DATASET, "seed": SEED, "epochs": EPOCHS,
                     "max_drop": MAX_DROP, **asdict(reps)},
        "throughput": {**asdict(throughput), "plain_per_s": throughput.plain_per_s,
                       "cascade_per_s": throughput.cascade_per_s, "throughput_ratio": 1 / throughput.time_ratio,
                       "plain": asdict(plain), "cascade": asdict(cascade)},
        "overhead": [{**asdict(r), "plain_per_s": r.plain_per_s, "cascade_per_s": r.cascade_per_s}
                     for r in overhead],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", path)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer warm-up passes and rounds")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
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
    logger.info("torch %s, %d threads, %s", torch.__version__, torch.get_num_threads(), reps)

    splits = split_dataset(load_dataset(DATASET))
    test_inputs, test_labels = stack(splits.test)
    model = build_model(MODEL)
    net = build_cascade(model, splits.train, splits.calib, test_inputs[:1])
    check_same_backbone(model, net, test_inputs)
    plain, cascade = plain_runner(model), cascade_runner(net)

    plain_q = plain_quality(model, test_inputs, test_labels)
    cascade_q = cascade_quality(net, test_inputs, test_labels, THROUGHPUT_BATCH)
    batches = make_pass(test_inputs, THROUGHPUT_BATCH, reps.pass_samples, keep_partial=True)
    throughput = race("(a) calibrated", plain, cascade, batches, reps)

    net.set_policy(never_exit(net.policy))
    forced = cascade_quality(net, test_inputs, test_labels, THROUGHPUT_BATCH)
    if forced.exit_rates[-1] != 1.0:
        raise RuntimeError(f"with every threshold NEVER some samples still left early: {forced.exit_rates}")
    overhead = [race(f"(b) batch {size}", plain, cascade,
                     make_pass(test_inputs, size, reps.pass_samples, keep_partial=False), reps)
                for size in OVERHEAD_BATCHES]

    print_report(Console(), throughput, plain_q, cascade_q, overhead)
    if args.json:
        write_json(args.json, args, reps, throughput, plain_q, cascade_q, overhead)


if __name__ == "__main__":
    main()
