"""A stage: the compute for one contiguous range of an early-exit net, with per-row routing.

A stage runs from cut ``start`` (``None``: the model input) to cut ``end`` (``None``: the model output).
:data:`INPUT` as a cut means "before any layer": a stage ending there computes nothing and forwards the
input itself (an edge that ships its input to the cloud), and a stage starting there takes the input
from the wire.
Every exit whose cut lies in ``(start, end]`` is evaluated inside it: confident rows are answered there
and only the others run on, compacted. Whatever is left at ``end`` is handed back to be forwarded to the
next stage. ``EarlyExitNet.infer`` is the stage from ``None`` to ``None``; a chain of stages over the
same cuts therefore gives exactly the answers of one process.

This module is pure compute: no threads, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitexit.config import ExitPolicy
from splitexit.errors import CutError
from splitexit.model.heads import checked_scores, confidence_function
from splitexit.tensors import TensorInfo

if TYPE_CHECKING:
    from splitexit.model.exits import EarlyExitNet

__all__ = ["INPUT", "Stage", "StageOutput"]

#: The cut before any layer: where a stage that forwards the raw input ends.
INPUT = -1

Confidence = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StageOutput:
    """What a stage did with a batch: rows it answered, and rows (with tensors) to forward."""

    rows: torch.Tensor  # (A,) indices into the input batch of the rows answered here
    exit: torch.Tensor  # (A,) exit index per answered row
    prediction: torch.Tensor  # (A,)
    confidence: torch.Tensor  # (A,)
    logits: torch.Tensor  # (A, C) logits of the exit that answered (before temperature)
    forward_rows: torch.Tensor  # (F,) indices into the input batch of rows to send on
    forward: tuple[torch.Tensor, ...]  # tensors crossing the end cut, F rows each


@dataclass(frozen=True)
class _Part:
    #: An fx segment: returns the tuple of tensors crossing its end cut, or the logits at the model output.
    segment: torch.nn.Module
    exit: int | None  # exit index evaluated after this segment; None: pass the values on


class Stage:
    """Segments and exits of ``net`` between two cuts; call :meth:`run` under inference mode."""

    net: EarlyExitNet
    start: int | None
    end: int | None
    parts: list[_Part]
    exits: list[int]
    input_tensors: tuple[TensorInfo, ...] | None  # None: the model input, taken as the net takes it
    output_tensors: tuple[TensorInfo, ...] | None  # None: the model output

    def __init__(self, net: EarlyExitNet, start: int | None, end: int | None, *,
                 policy: ExitPolicy | None = None):
        self.policy = policy  # None: the net's own (read at every batch, so calibration shows at once)
        if end == INPUT:
            if start not in (None, INPUT):
                raise CutError(f"only a stage that starts at the input can end there; got cut {start}")
            self.net, self.start, self.end = net, None, INPUT
            self.parts, self.exits = [], []
            self.input_tensors, self.output_tensors = None, (net.input_info,)
            return
        from_wire = start == INPUT
        start = None if from_wire else start
        if start is not None and end is not None and end <= start:
            raise CutError(f"a stage must end after it starts; got cuts {start} to {end}")
        for cut in (start, end):
            if cut is not None:
                net.graph.cut(cut)
        self.net, self.start, self.end = net, (INPUT if from_wire else start), end
        inside = [(i, c.id) for i, c in enumerate(net.exit_cuts)
                  if (start is None or c.id > start) and (end is None or c.id <= end)]
        exit_at = {cut: i for i, cut in inside}
        bounds = sorted({*(cut for _, cut in inside)} - {end}, key=int)
        edges = [start, *bounds, end]
        self.parts = [_Part(net.segment_between(a, b), exit_at.get(b) if b is not None else net.num_exits - 1)
                      for a, b in zip(edges[:-1], edges[1:])]
        self.exits = [i for i, _ in inside] + ([net.num_exits - 1] if end is None else [])
        self.input_tensors = (net.graph.crossing_info(start) if start is not None
                              else (net.input_info,) if from_wire else None)
        self.output_tensors = (net.graph.crossing_info(end) if end is not None else None)

    def run(self, inputs: tuple[torch.Tensor, ...], confidence: Confidence | None = None) -> StageOutput:
        """Route a batch through the stage. ``inputs`` are the tensors crossing ``start``, batch first."""
        net = self.net
        policy = self.policy or net.policy
        score = confidence or confidence_function(policy.confidence)
        batch = inputs[0].shape[0]
        rows = torch.arange(batch)
        answered: list[tuple[torch.Tensor, ...]] = []
        values: tuple[torch.Tensor, ...] = inputs
        final = net.num_exits - 1
        for part in self.parts:
            result = part.segment(*values)
            if part.exit is None or (part.exit != final and policy.thresholds[part.exit] == math.inf):
                values = result  # no exit here, or one that can never fire
                continue
            is_final = part.exit == final
            logits = result if is_final else net.heads[part.exit](result[0])
            scores = checked_scores(score, logits / policy.temperatures[part.exit])
            leave = None if is_final else scores >= policy.thresholds[part.exit]
            leaving = rows.numel() if leave is None else int(leave.sum())
            if leaving == 0:
                values = result
                continue
            if leave is None or leaving == rows.numel():  # everyone answers here: no compaction needed
                answered.append(_answers(rows, part.exit, logits, scores))
                rows, values = rows[:0], ()
                break
            stay = (~leave).nonzero().squeeze(1)
            go = leave.nonzero().squeeze(1)
            answered.append(_answers(rows[go], part.exit, logits[go], scores[go]))
            rows = rows[stay]
            values = tuple(t.index_select(0, stay) for t in result)
        return _output(answered, rows, values, net.num_classes)


def _answers(rows: torch.Tensor, exit_index: int, logits: torch.Tensor, scores: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
    return (rows, torch.full((rows.numel(),), exit_index, dtype=torch.int64), logits.argmax(dim=1),
            scores.float(), logits.float())


def _output(answered: list[tuple[torch.Tensor, ...]], rows: torch.Tensor, values: tuple[torch.Tensor, ...],
            classes: int) -> StageOutput:
    if len(answered) == 1:
        parts = list(answered[0])
    elif answered:
        parts = [torch.cat(column) for column in zip(*answered)]
    else:
        parts = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                 torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0, classes)]
    answered_rows, exits, predictions, confidences, logits = parts
    return StageOutput(answered_rows, exits, predictions, confidences, logits, forward_rows=rows, forward=values)
