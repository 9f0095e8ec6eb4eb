"""Where a stage of the model starts or ends: a cut point's id, or one of the model's two boundaries.

Every layer says the same thing the same way: a stage runs from ``start`` to ``end``, each a :data:`Cut`;
:data:`MODEL_INPUT` and :data:`MODEL_OUTPUT` are the model's own ends. A stage that ends at the input
computes nothing and forwards the input itself (an edge that ships its input on); the cluster file writes
that as ``ends_at: input``, and JSON (profiles, published plans, stage files) as ``"input"`` / ``"output"``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, TypeAlias

__all__ = ["MODEL_INPUT", "MODEL_OUTPUT", "Boundary", "Cut", "cut_from_json", "cut_label", "cut_order"]


class Boundary(StrEnum):
    """One end of the model, as opposed to a cut point between two of its layers."""

    INPUT = "input"
    OUTPUT = "output"


MODEL_INPUT: Final = Boundary.INPUT
MODEL_OUTPUT: Final = Boundary.OUTPUT

#: A cut point's id (see ``splitexit cuts``), or a boundary of the model.
Cut: TypeAlias = int | Boundary


def cut_label(cut: Cut, *, compact: bool = False) -> str:
    """``cut 3``, ``input``, ``output``; ``compact``: ``3``, ``in``, ``out`` (tables)."""
    if isinstance(cut, Boundary):
        return ("in" if cut is MODEL_INPUT else "out") if compact else cut.value
    return str(cut) if compact else f"cut {cut}"


def cut_from_json(value: object) -> Cut:
    """A cut as JSON writes it (an id, ``"input"`` or ``"output"``); ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a cut is a cut id, 'input' or 'output'; got {value!r}")
    if isinstance(value, str):
        return Boundary(value)
    if value < 0:
        raise ValueError(f"a cut id is 0 or more; got {value}")
    return value


def cut_order(cut: Cut) -> float:
    """A sort key that puts cuts in forward order: the input first, the output last."""
    if cut is MODEL_INPUT:
        return -1.0
    return float("inf") if cut is MODEL_OUTPUT else float(cut)
