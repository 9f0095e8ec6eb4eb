"""Benchmark: what each wire codec costs and saves on real activations, on the CPU.

Two sets of activations, each taken at the cuts where exits sit (the tensors a split plan would send):

(a) **digits_cnn** on scikit-learn's digits, trained jointly with its auto exits for 5 epochs; the test
    split's activations at each exit cut, sent in messages of ``--batch`` rows. Besides bytes and speed,
    the *accuracy change*: the activation crossing the cut is encoded and decoded before the rest of the
    net (``net.graph.segment(cut, MODEL_OUTPUT)``) runs, and the final exit's test accuracy is compared with the
    unencoded one.
(b) **resnet18** with random weights (nothing is downloaded), eval mode, a batch of 8 synthetic 224x224
    inputs, at the cuts after layer1, layer2 and layer3 (post-ReLU, like most CNN activations).

For every codec: bytes per message (the serialised protobuf `Tensor` header plus its payload) and the
ratio to raw, encode and decode throughput in MB/s of activation (float32 bytes), and the largest error
relative to the activation's largest magnitude. Times are medians over repeated passes in one process; the
box is shared, so compare rows of one run, not absolute numbers between runs.

Run ``.venv/bin/python bench/codecs.py`` (``--quick``: fewer passes); ``--write-docs`` also writes the
results as the "Codecs" section of ``docs/benchmarks.md`` (replacing that section only).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import splitexit
from splitexit.config import TrainConfig
from splitexit.config.codec_names import CodecSpec, list_codecs, parse_codec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.model.exits import EarlyExitNet
from splitexit.wire.tensor_codec import decode, encode

logger = logging.getLogger("bench.codecs")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Codecs"
SEED = 0
DIGITS_EPOCHS = 5
RESNET_BATCH = 8
RESNET_CUTS = ("layer1", "layer2", "layer3")
MB = 1e6
#: Line width of the prose written to docs/benchmarks.md (the file's own).
WRAP = 110


@dataclass(frozen=True)
class Passes:
    """Timed passes per codec (after one warm-up pass)."""

    repeats: int


FULL = Passes(repeats=9)
QUICK = Passes(repeats=3)


@dataclass(frozen=True)
class Row:
    """One codec on the activations of one cut."""

    codec: str
    bytes_per_message: float
    ratio: float  # bytes / raw bytes
    encode_mb_s: float
    decode_mb_s: float
    max_rel_error: float
    accuracy_change: float | None  # final-exit accuracy with the codec minus without (digits only)


@dataclass(frozen=True)
class CutResult:
    model: str
    cut: str
    shape: tuple[int, ...]  # one message's tensor
    messages: int
    zero_fraction: float
    baseline_accuracy: float | None
    rows: list[Row]


# ---------------------------------------------------------------------------------------------- measuring
def measure(messages: Sequence[torch.Tensor], codec: CodecSpec, passes: Passes) -> tuple[float, float, float, list]:
    """Bytes per message, median encode and decode seconds per pass, and the decoded messages."""
    limit = max(m.numel() * m.element_size() for m in messages)
    encoded = [encode(m, codec) for m in messages]  # warm-up, and the bytes (deterministic)
    decoded = [decode(e.header, e.payload, max_bytes=limit) for e in encoded]
    encode_times, decode_times = [], []
    for _ in range(passes.repeats):
        start = time.perf_counter()
        encoded = [encode(m, codec) for m in messages]
        middle = time.perf_counter()
        decoded = [decode(e.header, e.payload, max_bytes=limit) for e in encoded]
        encode_times.append(middle - start)
        decode_times.append(time.perf_counter() - middle)
    size = sum(e.header.ByteSize() + e.size for e in encoded) / len(encoded)
    return size, statistics.median(encode_times), statistics.median(decode_times), decoded


def codec_rows(model: str, cut: str, messages: list[torch.Tensor], passes: Passes,
               rest: torch.nn.Module | None = None, labels: torch.Tensor | None = None) -> CutResult:
    """Every codec on one cut's messages; with ``rest`` and ``labels``, also the accuracy change."""
    activations = torch.cat(messages)
    scale = float(activations.abs().max()) or 1.0
    raw_bytes = sum(m.numel() * m.element_size() for m in messages)
    baseline = accuracy(rest, messages, labels) if rest is not None else None
    rows, raw_size = [], None
    for name in list_codecs():
        size, encode_s, decode_s, decoded = measure(messages, parse_codec(name), passes)
        raw_size = raw_size or size
        error = float((torch.cat(decoded) - activations).abs().max()) / scale
        change = accuracy(rest, decoded, labels) - baseline if rest is not None and baseline is not None else None
        rows.append(Row(codec=name, bytes_per_message=size, ratio=size / raw_size,
                        encode_mb_s=raw_bytes / encode_s / MB, decode_mb_s=raw_bytes / decode_s / MB,
                        max_rel_error=error, accuracy_change=change))
        logger.info("%s %s %-11s ratio %.3f  encode %7.0f MB/s  decode %7.0f MB/s", model, cut, name,
                    rows[-1].ratio, rows[-1].encode_mb_s, rows[-1].decode_mb_s)
    return CutResult(model=model, cut=cut, shape=tuple(messages[0].shape), messages=len(messages),
                     zero_fraction=float((activations == 0).double().mean()), baseline_accuracy=baseline,
                     rows=rows)


def accuracy(rest: torch.nn.Module, messages: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = torch.cat([rest(m) for m in messages])
    return float((logits.argmax(dim=1) == labels).double().mean())


# ---------------------------------------------------------------------------------------------- models
def digits_results(batch: int, passes: Passes) -> list[CutResult]:
    torch.manual_seed(SEED)
    splits = splitexit.split_dataset(splitexit.load_dataset("digits"))
    inputs, labels = zip(*(splits.test[i] for i in range(len(splits.test))))
    test_inputs, test_labels = torch.stack(inputs), torch.as_tensor(labels)
    net = EarlyExitNet.from_model(splitexit.build_model("digits_cnn"), test_inputs[:1])
    started = time.perf_counter()
    splitexit.train(net, splits.train, TrainConfig(epochs=DIGITS_EPOCHS, seed=SEED))
    logger.info("digits_cnn trained for %d epochs in %.1f s", DIGITS_EPOCHS, time.perf_counter() - started)
    net.eval()
    results = []
    for cut, name in zip(net.exit_cuts, net.exit_names()):
        head = net.graph.segment(MODEL_INPUT, cut.id).eval()
        rest = net.graph.segment(cut.id, MODEL_OUTPUT).eval()
        with torch.inference_mode():
            crossing = [head(test_inputs[i:i + batch]) for i in range(0, len(test_inputs), batch)]
        messages = [c[0].clone() for c in crossing]  # one tensor crosses an exit cut
        results.append(codec_rows("digits_cnn", f"{name} (cut {cut.id})", messages, passes,
                                  rest=rest, labels=test_labels))
    return results


def resnet_results(passes: Passes) -> list[CutResult]:
    torch.manual_seed(SEED)
    model = splitexit.build_model("resnet18", 10).eval()
    inputs = torch.randn(RESNET_BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
    net = EarlyExitNet.from_model(model, inputs[:1], exits=list(RESNET_CUTS))
    results = []
    for cut, name in zip(net.exit_cuts, RESNET_CUTS):
        with torch.inference_mode():
            activation = net.graph.segment(MODEL_INPUT, cut.id).eval()(inputs)[0].clone()
        results.append(codec_rows("resnet18", name, [activation], passes))
    return results


# ---------------------------------------------------------------------------------------------- report
def change_text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f} pt"


def rich_table(result: CutResult) -> Table:
    title = (f"{result.model} at {result.cut}: {result.messages} message(s) of {tuple(result.shape)} float32, "
             f"{100 * result.zero_fraction:.0f}% zeros")
    if result.baseline_accuracy is not None:
        title += f", final-exit accuracy {result.baseline_accuracy:.4f} unencoded"
    table = Table(title=title)
    columns = ["codec", "bytes/message", "vs raw", "encode MB/s", "decode MB/s", "max error / max |x|"]
    if result.baseline_accuracy is not None:
        columns.append("accuracy change")
    for column in columns:
        table.add_column(column, justify="left" if column == "codec" else "right")
    for row in result.rows:
        cells = [row.codec, f"{row.bytes_per_message:,.0f}", f"{row.ratio:.3f}", f"{row.encode_mb_s:,.0f}",
                 f"{row.decode_mb_s:,.0f}", f"{row.max_rel_error:.1e}"]
        if result.baseline_accuracy is not None:
            cells.append(change_text(row.accuracy_change))
        table.add_row(*cells)
    return table


def markdown_table(result: CutResult) -> str:
    digits = result.baseline_accuracy is not None
    header = ["codec", "bytes/msg", "vs raw", "encode MB/s", "decode MB/s", "max err / max abs"]
    header += ["Δ accuracy"] if digits else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in result.rows:
        cells = [f"`{row.codec}`", f"{row.bytes_per_message:,.0f}", f"{row.ratio:.3f}", f"{row.encode_mb_s:,.0f}",
                 f"{row.decode_mb_s:,.0f}", f"{row.max_rel_error:.1e}"]
        cells += [change_text(row.accuracy_change)] if digits else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_section(results: list[CutResult], command: str, elapsed_s: float, batch: int, load: str) -> str:
    env = environment()
    intro = (
        "`bench/codecs.py` measures every wire codec (`splitexit.wire.tensor_codec`) on real activations: bytes "
        "per message (the serialised protobuf `Tensor` header plus its payload) and the ratio to `raw`, encode and "
        "decode throughput in MB/s of float32 activation, and the largest error over the largest |value|. "
        f"(a) `digits_cnn` trained jointly with its exits for {DIGITS_EPOCHS} epochs, the test split's "
        f"activations at each exit cut in messages of {batch} rows; *Δ accuracy* is the change of the final "
        "exit's test accuracy when the activation crossing that cut is encoded and decoded before the rest of "
        f"the net runs. (b) `resnet18` with random weights, eval mode, a batch of {RESNET_BATCH} synthetic "
        "224×224 inputs, at the cuts after layer1, layer2 and layer3 (one message each). Times are medians of "
        "repeated passes in one process on a shared box: compare rows, not runs."
    )
    machine = (
        f"Machine: {env['cpu_count']} vCPUs ({env['machine']}), torch {env['torch']}, Python {env['python']}, "
        f"{env['threads']} intra-op thread(s), source at `{env['revision']}`; 1-minute load average "
        f"{load} at the start (other jobs share the box). Run time {elapsed_s:.0f} s."
    )
    parts = [SECTION, "", textwrap.fill(intro, WRAP), "", "```sh", command, "```", "",
             textwrap.fill(machine, WRAP), ""]
    for result in results:
        title = f"**{result.model} at {result.cut}**: {result.messages} message(s) of {result.shape}, " \
                f"{100 * result.zero_fraction:.0f}% zeros"
        if result.baseline_accuracy is not None:
            title += f"; final-exit accuracy unencoded {result.baseline_accuracy:.4f}"
        parts += [title, "", markdown_table(result), ""]
    parts += [summary(results), ""]
    return "\n".join(parts)


def summary(results: list[CutResult]) -> str:
    """A few sentences drawn from the numbers, so the section reads without the tables."""
    def row(result: CutResult, codec: str) -> Row:
        return next(r for r in result.rows if r.codec == codec)

    lines = ["**Reading it.**", ""]
    for result in results:
        int8z, fp16, raw_z = row(result, "int8+zstd"), row(result, "fp16"), row(result, "raw+zstd")
        text = (f"- {result.model} {result.cut}: `int8+zstd` sends {int8z.ratio:.3f} of raw "
                f"(encode {int8z.encode_mb_s:,.0f} MB/s, decode {int8z.decode_mb_s:,.0f} MB/s), `fp16` "
                f"{fp16.ratio:.3f}, lossless `raw+zstd` {raw_z.ratio:.3f}")
        if int8z.accuracy_change is not None:
            worst = min(r.accuracy_change for r in result.rows if r.accuracy_change is not None)
            text += f"; accuracy moves by {change_text(int8z.accuracy_change)} under int8+zstd " \
                    f"(worst codec {change_text(worst)})"
        lines.append(textwrap.fill(text + ".", WRAP, subsequent_indent="  "))
    per_channel = sum(row(r, "int8c+zstd").bytes_per_message <= row(r, "int8+zstd").bytes_per_message
                      for r in results)
    text = (f"- Per-channel scales (`int8c+zstd`) sent no more bytes than per-tensor `int8+zstd` at {per_channel} "
            f"of {len(results)} cuts")
    if per_channel == 0:
        text += ("; every channel spreads over all 256 levels, which compresses worse, and these activations "
                 "did not need the finer per-channel error bound")
    lines.append(textwrap.fill(text + ".", WRAP, subsequent_indent="  "))
    return "\n".join(lines)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def write_docs(path: Path, section: str) -> None:
    """Put the section into the file: replace an existing "## Codecs" section, else append it.

    The file is re-read right before writing, since other benchmarks write their own sections.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new_text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        kept_after = lines[end:]
        new_text = "\n".join(lines[:start]) + "\n" + section.rstrip("\n") + "\n"
        if kept_after:
            new_text += "\n" + "\n".join(kept_after) + "\n"
    path.write_text(new_text)
    logger.info("wrote the %r section of %s", SECTION, path)


def environment() -> dict[str, object]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "revision": source_revision()}


def source_revision() -> str:
    """The commit benchmarked, "+dirty" when src/ has uncommitted changes; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed passes per codec")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="rows per digits message (default 32)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the results as the {SECTION!r} section of docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    passes = QUICK if args.quick else FULL
    load = load_average()
    started = time.perf_counter()
    results = digits_results(args.batch, passes) + resnet_results(passes)
    elapsed = time.perf_counter() - started
    console = Console()
    if not console.is_terminal:
        console.width = 132
    for result in results:
        console.print(rich_table(result))
    console.print(summary(results))
    if args.write_docs:
        command = " ".join([".venv/bin/python bench/codecs.py", *(argv if argv is not None else sys.argv[1:])])
        write_docs(DOCS, markdown_section(results, command, elapsed, args.batch, load))


if __name__ == "__main__":
    main()
