"""A stage: the compute for one contiguous range of an early-exit net, with per-row routing.

A stage runs from cut ``start`` to cut ``end`` (see :mod:`splitexit.cuts`). A stage that ends at
``MODEL_INPUT`` computes nothing and forwards the input itself (an edge that ships its input to the cloud).
Every exit whose cut lies in ``(start, end]`` is evaluated inside it: confident rows are answered there
and only the others run on, compacted. Whatever is left at ``end`` is handed back to be forwarded to the
next stage. ``EarlyExitNet.infer`` is the stage from input to output; a chain of stages over the
same cuts therefore gives exactly the answers of one process.

:meth:`Stage.compiled` gives the same stage with every segment and head wrapped (``torch.compile``) and
each call padded with zero rows to the next of a few batch sizes, so a compiled graph (a CUDA graph under
``reduce-overhead``) sees only those shapes; padded rows are dropped before any exit looks at them.

This module is pure compute: no threads, no I/O.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from splitexit.config import ExitPolicy
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut, cut_label, cut_order
from splitexit.errors import CutError
from splitexit.model.heads import checked_scores, confidence_function
from splitexit.tensors import TensorInfo

if TYPE_CHECKING:
    from splitexit.model.exits import EarlyExitNet

__all__ = ["Stage", "StageOutput", "batch_buckets"]

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


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled stage is padded to: powers of two below ``max_batch``, and ``max_batch``."""
    sizes = [1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i < max_batch]
    return (*sizes, max(1, max_batch))


class _Padded(torch.nn.Module):
    """``call`` on batches padded with zero rows to the next bucket; its outputs cut back to the real rows.
    A batch larger than every bucket goes through unpadded."""

    def __init__(self, call: Callable[..., Any], buckets: Sequence[int]):
        super().__init__()
        self.call, self.buckets = call, tuple(sorted(buckets))

    def forward(self, *tensors: torch.Tensor) -> Any:
        rows = tensors[0].shape[0]
        at = bisect.bisect_left(self.buckets, rows)
        if at == len(self.buckets) or self.buckets[at] == rows:
            return self.call(*tensors)
        pad = self.buckets[at] - rows
        out = self.call(*(torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) for t in tensors))
        return tuple(o[:rows] for o in out) if isinstance(out, tuple) else out[:rows]


@dataclass(frozen=True)
class _Part:
    #: An fx segment (or its compiled, padded twin): returns the tuple of tensors crossing its end cut, or the
    #: logits at the model output.
    segment: torch.nn.Module
    exit: int | None  # exit index evaluated after this segment; None: pass the values on


class Stage:
    """Segments and exits of ``net`` between two cuts; call :meth:`run` under inference mode."""

    net: EarlyExitNet
    start: Cut
    end: Cut
    parts: list[_Part]
    exits: list[int]
    input_tensors: tuple[TensorInfo, ...]  # what crosses ``start``, per sample
    output_tensors: tuple[TensorInfo, ...] | None  # what crosses ``end``; None at the model output (answers)

    def __init__(self, net: EarlyExitNet, start: Cut, end: Cut, *, policy: ExitPolicy | None = None):
        self.policy = policy  # None: the net's own (read at every batch, so calibration shows at once)
        self.net, self.start, self.end = net, start, end
        self._heads: dict[int, torch.nn.Module] = {}  # compiled exit heads (see `compiled`); else the net's
        self._edges: list[Cut] = []  # where each part starts
        if start is MODEL_OUTPUT:
            raise CutError("a stage cannot start at the model output")
        self.input_tensors = (net.input_info,) if start is MODEL_INPUT else net.graph.crossing_info(start)
        if end is MODEL_INPUT:
            if start is not MODEL_INPUT:
                raise CutError(f"only a stage that starts at the input can end there; got {cut_label(start)}")
            self.parts, self.exits = [], []
            self.output_tensors = (net.input_info,)
            return
        if cut_order(end) <= cut_order(start):
            raise CutError(f"a stage must end after it starts; got {cut_label(start)} to {cut_label(end)}")
        if isinstance(end, int):
            net.graph.cut(end)
        inside = [(i, c.id) for i, c in enumerate(net.exit_cuts) if cut_order(start) < c.id <= cut_order(end)]
        exit_at: dict[Cut, int] = {cut: i for i, cut in inside}
        bounds: list[Cut] = sorted({*(cut for _, cut in inside)} - {end})
        edges = [start, *bounds, end]
        self._edges = edges[:-1]
        self.parts = [_Part(net.segment_between(a, b), net.num_exits - 1 if b is MODEL_OUTPUT else exit_at.get(b))
                      for a, b in zip(edges[:-1], edges[1:])]
        self.exits = [i for i, _ in inside] + ([net.num_exits - 1] if end is MODEL_OUTPUT else [])
        self.output_tensors = None if end is MODEL_OUTPUT else net.graph.crossing_info(end)

    def compiled(self, wrap: Callable[[torch.nn.Module], Callable[..., Any]], buckets: Sequence[int]) -> Stage:
        """This stage with each segment and exit head wrapped by ``wrap`` (e.g. ``torch.compile``), every call
        padded to the next of ``buckets`` rows; the net and its own stages are left as they are."""
        twin = Stage(self.net, self.start, self.end, policy=self.policy)
        twin.parts = [replace(part, segment=_Padded(wrap(part.segment), buckets)) for part in self.parts]
        twin._heads = {i: _Padded(wrap(self.net.heads[i]), buckets) for i in self.exits if i < self.net.num_exits - 1}
        return twin

    def warm_up(self, buckets: Sequence[int], device: torch.device) -> None:
        """Run every segment and head once at each bucket size (zeros on ``device``), so that a compiled stage
        compiles now rather than on its first requests; call under inference mode."""
        for start, part in zip(self._edges, self.parts):
            infos = (self.net.input_info,) if not isinstance(start, int) else self.net.graph.crossing_info(start)
            for rows in buckets:
                out = part.segment(*(torch.zeros((rows, *i.shape), dtype=i.dtype, device=device) for i in infos))
                if part.exit in self._heads:
                    self._heads[part.exit](out[0])

    def run(self, inputs: tuple[torch.Tensor, ...], confidence: Confidence | None = None) -> StageOutput:
        """Route a batch through the stage. ``inputs`` are the tensors crossing ``start``, batch first."""
        net = self.net
        policy = self.policy or net.policy
        score = confidence or confidence_function(policy.confidence)
        batch = inputs[0].shape[0]
        rows = torch.arange(batch, device=inputs[0].device)  # on the compute device, as the masks it meets
        answered: list[tuple[torch.Tensor, ...]] = []
        values: tuple[torch.Tensor, ...] = inputs
        final = net.num_exits - 1
        for part in self.parts:
            result = part.segment(*values)
            if part.exit is None or (part.exit != final and policy.thresholds[part.exit] == math.inf):
                values = result  # no exit here, or one that can never fire
                continue
            is_final = part.exit == final
            logits = result if is_final else self._heads.get(part.exit, net.heads[part.exit])(result[0])
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
    exits = torch.full((rows.numel(),), exit_index, dtype=torch.int64, device=rows.device)
    return (rows, exits, logits.argmax(dim=1),
            scores.float(), logits.float())


def _output(answered: list[tuple[torch.Tensor, ...]], rows: torch.Tensor, values: tuple[torch.Tensor, ...],
            classes: int) -> StageOutput:
    if len(answered) == 1:
        parts = list(answered[0])
    elif answered:
        parts = [torch.cat(column) for column in zip(*answered)]
    else:
        at = rows.device
        parts = [torch.empty(0, dtype=torch.int64, device=at), torch.empty(0, dtype=torch.int64, device=at),
                 torch.empty(0, dtype=torch.int64, device=at), torch.empty(0, device=at),
                 torch.empty(0, classes, device=at)]
    answered_rows, exits, predictions, confidences, logits = parts
    return StageOutput(answered_rows, exits, predictions, confidences, logits, forward_rows=rows, forward=values)
