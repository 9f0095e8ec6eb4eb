"""What crosses a cut, described once for the model, the planner and the wire."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorInfo"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor crossing a cut, described per sample (the batch dimension is left out)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def bytes_per_sample(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize
