"""Benchmark: a ResNet-50 stage on each device this machine has, in each dtype, and pinned vs pageable copies.

Three questions, each answered by contenders timed in one process, interleaved round by round (who goes first
rotates), every figure the median over rounds:

(a) **Throughput** of the whole-model ResNet-50 stage (random weights, 224x224, exits attached) as a node runs
    it (``runtime/devices.py``: the batch moved to the device, ``Stage.run`` under autocast, the device
    synchronised) at batch 1, 8 and 32, on the CPU and on every CUDA device; the ratio is GPU over CPU.
(b) **Precision**: bf16 (and, on a GPU, fp16) autocast against fp32 on the same device and inputs: top-1
    agreement and the largest logit error.
(c) **Transfers** (CUDA only): a batch of 1, 4 and 16 MiB to the GPU from pageable memory, from a pinned
    payload buffer as a ``pin_memory: true`` node receives it (:func:`~splitexit.runtime.devices.to_device`
    on its side stream), and the ratio.

Without CUDA, (a) and (b) run on the CPU alone and (c) says it was skipped. On a GPU machine run it with
``make test-gpu`` as ``make gpu-check``. ``--quick`` for fewer rounds, ``--json PATH`` to keep the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stages import Stage
from splitexit.model.zoo import build_model
from splitexit.runtime.devices import ComputeDevice, available, choose_device, to_device

BATCHES = (1, 8, 32)
TRANSFER_MIB = (1, 4, 16)
SHAPE = (3, 224, 224)


def resnet50_stage() -> Stage:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("resnet50", 1000), torch.zeros(1, *SHAPE)).eval()
    return net.stage(MODEL_INPUT, MODEL_OUTPUT)


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, the order rotating every round."""
    for run in contenders.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def stage_call(stage: Stage, compute: ComputeDevice, x: torch.Tensor) -> Callable[[], object]:
    """One batch as a node computes it: onto the device, run under autocast, wait for the device."""
    def call() -> object:
        with torch.inference_mode(), compute.autocast():
            out = stage.run(to_device((x,), compute))
        compute.synchronize()
        return out
    return call


def logits_in_order(stage: Stage, compute: ComputeDevice, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), compute.autocast():
        out = stage.run(to_device((x,), compute))
    return out.logits[torch.argsort(out.rows)].float().cpu()


def throughput(stage: Stage, devices: list[ComputeDevice], rounds: int) -> list[dict[str, object]]:
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
        seconds = interleaved(_own_weights(stage, devices, x), rounds)
        cpu = seconds["cpu"]
        for name, s in seconds.items():
            rows.append({"batch": batch, "device": name, "ms": s * 1e3, "inputs_per_s": batch / s,
                         "vs_cpu": cpu / s})
    return rows


def _own_weights(stage: Stage, devices: list[ComputeDevice], x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """A call per device, each on its own copy of the weights there (the CPU's is the net itself)."""
    calls = {}
    for compute in devices:
        twin = compute.copy_for(stage.net)
        calls[compute.name] = stage_call(twin.stage(stage.start, stage.end), compute, x)
    return calls


def precision(stage: Stage, device: str, rows: int) -> list[dict[str, object]]:
    x = torch.randn(rows, *SHAPE, generator=torch.Generator().manual_seed(7))
    fp32 = choose_device(device, "fp32", member="bench")
    here = fp32.copy_for(stage.net).stage(stage.start, stage.end)
    reference = logits_in_order(here, fp32, x)
    out = []
    for dtype in ("bf16", "fp16") if device != "cpu" else ("bf16",):
        logits = logits_in_order(here, choose_device(device, dtype, member="bench"), x)
        out.append({"device": device, "dtype": dtype, "top1_agreement": float(
            (logits.argmax(1) == reference.argmax(1)).float().mean()),
            "max_logit_error": float((logits - reference).abs().max()),
            "logit_scale": float(reference.abs().max())})
    return out


def transfers(device: str, rounds: int) -> list[dict[str, object]]:
    pinned = choose_device(device, "fp32", member="bench", pin_memory=True)
    assert pinned.payload_buffer is not None
    target = torch.device(device)
    out = []
    for mib in TRANSFER_MIB:
        pageable = torch.randn(mib << 18)  # float32: mib MiB
        buffer = torch.frombuffer(pinned.payload_buffer(mib << 20), dtype=torch.float32)
        buffer.copy_(pageable)

        def from_pageable(t: torch.Tensor = pageable) -> object:
            moved = t.to(target)
            torch.cuda.synchronize(target)
            return moved

        def from_pinned(t: torch.Tensor = buffer) -> object:
            moved = to_device((t,), pinned)
            torch.cuda.synchronize(target)
            return moved

        seconds = interleaved({"pageable": from_pageable, "pinned": from_pinned}, rounds * 4)
        out.append({"mib": mib, "pageable_ms": seconds["pageable"] * 1e3, "pinned_ms": seconds["pinned"] * 1e3,
                    "pinned_gb_per_s": (mib << 20) / seconds["pinned"] / 1e9,
                    "pageable_over_pinned": seconds["pageable"] / seconds["pinned"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    console = Console()
    gpus = [d for d in available() if d.startswith("cuda")]
    devices = [choose_device(d, "fp32", member="bench") for d in ["cpu", *gpus]]
    about = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
             "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
             "gpus": [torch.cuda.get_device_name(i) for i in range(len(gpus))]}
    console.print(about)
    stage = resnet50_stage()
    figures: dict[str, object] = {"about": about, "throughput": throughput(stage, devices, rounds)}
    table = Table("batch", "device", "ms per batch", "inputs/s", "x the CPU", title="(a) ResNet-50 stage")
    for row in figures["throughput"]:  # type: ignore[attr-defined]
        table.add_row(str(row["batch"]), row["device"], f"{row['ms']:.1f}", f"{row['inputs_per_s']:.1f}",
                      f"{row['vs_cpu']:.2f}x")
    console.print(table)
    figures["precision"] = [p for d in ["cpu", *gpus[:1]] for p in precision(stage, d, 32 if args.quick else 64)]
    table = Table("device", "dtype", "top-1 agreement with fp32", "max logit error", "max |logit|",
                  title="(b) autocast against fp32")
    for row in figures["precision"]:  # type: ignore[attr-defined]
        table.add_row(row["device"], row["dtype"], f"{row['top1_agreement']:.3f}", f"{row['max_logit_error']:.4f}",
                      f"{row['logit_scale']:.3f}")
    console.print(table)
    if gpus:
        figures["transfers"] = transfers(gpus[0], rounds)
        table = Table("MiB", "pageable ms", "pinned ms", "pinned GB/s", "pageable / pinned",
                      title=f"(c) host to {gpus[0]}")
        for row in figures["transfers"]:  # type: ignore[attr-defined]
            table.add_row(str(row["mib"]), f"{row['pageable_ms']:.3f}", f"{row['pinned_ms']:.3f}",
                          f"{row['pinned_gb_per_s']:.1f}", f"{row['pageable_over_pinned']:.2f}x")
        console.print(table)
    else:
        console.print("(c) transfers: skipped, this machine has no CUDA device")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
