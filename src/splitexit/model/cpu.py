"""Pick the memory format and thread count that run a net fastest on this CPU, by measuring.

Defaults are not safe to assume: the reference box ran ResNet-50 at batch 1 in ~970 ms contiguous and
~98 ms channels_last, while another 2-core box measured 71 ms vs 67 ms. So each candidate is timed
(median of a few runs after warm-up) and the fastest wins. The thread count is process-wide in torch,
so it is recorded here and applied only by the command that runs inference (`apply_threads`).
"""

from __future__ import annotations

import logging
import os
import time
from itertools import product

import torch

from splitexit.config import CpuSettings
from splitexit.model.exits import EarlyExitNet

__all__ = ["apply_cpu_settings", "apply_threads", "tune_cpu"]

logger = logging.getLogger(__name__)

WARMUP = 2
REPEATS = 5


def tune_cpu(net: EarlyExitNet, *, batch_size: int = 1, repeats: int = REPEATS) -> CpuSettings:
    """Time ``net.infer`` for each memory format and thread count, apply and return the fastest."""
    example = torch.randn(batch_size, *net.input_shape).to(net.input_dtype)
    formats = ["contiguous", "channels_last"] if len(net.input_shape) == 3 else ["contiguous"]
    threads = sorted({1, torch.get_num_threads(), os.cpu_count() or 1})
    original_threads = torch.get_num_threads()
    timings: dict[tuple[str, int], float] = {}
    try:
        for memory_format, count in product(formats, threads):
            apply_cpu_settings(net, CpuSettings(memory_format=memory_format, threads=count))
            torch.set_num_threads(count)
            timings[(memory_format, count)] = _median_seconds(net, example, repeats)
    finally:
        torch.set_num_threads(original_threads)
    (memory_format, count), best = min(timings.items(), key=lambda item: item[1])
    logger.info("CPU tuning (ms per batch of %d): %s", batch_size,
                {f"{f}/{t}": round(s * 1e3, 2) for (f, t), s in timings.items()})
    settings = CpuSettings(memory_format=memory_format, threads=count)
    apply_cpu_settings(net, settings)
    return settings


def apply_cpu_settings(net: EarlyExitNet, settings: CpuSettings) -> None:
    """Convert the net's weights to the memory format and remember the settings (threads are not set)."""
    fmt = torch.channels_last if settings.memory_format == "channels_last" else torch.contiguous_format
    net.to(memory_format=fmt)
    net.cpu = settings


def apply_threads(settings: CpuSettings) -> None:
    """Set torch's process-wide intra-op thread count, if the settings name one."""
    if settings.threads:
        torch.set_num_threads(settings.threads)


def _median_seconds(net: EarlyExitNet, example: torch.Tensor, repeats: int) -> float:
    for _ in range(WARMUP):
        net.infer(example)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.infer(example)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]
