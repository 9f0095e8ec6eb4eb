"""Compute cost from ``torch.utils.flop_counter``: per call, per segment, per head.

FLOPs here are what the flop counter sees (matmuls, convolutions, attention); element-wise work is
free. That is the usual convention and what "compute fraction" is measured in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "flops_per_sample"]

T = TypeVar("T")


def count_flops(call: Callable[[], T]) -> tuple[T, int]:
    """Run ``call()`` and return its result with the FLOPs it performed."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = call()
    return result, int(counter.get_total_flops())


def flops_per_sample(module: Callable[..., object], *inputs: torch.Tensor) -> int:
    """FLOPs of one forward of ``module`` divided by the batch size of ``inputs``."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
    with torch.no_grad():
        _, total = count_flops(lambda: module(*inputs))
    return total // max(batch, 1)
