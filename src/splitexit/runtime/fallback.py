"""Answering at the edge when the chain cannot: the cluster file's ``fallback`` (issue 14).

``exit``: the deepest exit inside the edge's own stage answers (where that stage holds none, the first
exit), whatever its confidence; earlier exits still answer the rows they are confident about. ``local``:
the edge runs the whole cascade itself. Either way the edge recomputes from the input (its stage's output
went to the chain and is gone), in a worker thread, on the edge's device. Which requests fall back (a
route failure with the deadline near) is the request path's decision; this module only computes.
"""

from __future__ import annotations

import asyncio
import math

import torch

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut, cut_order
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stages import Stage
from splitexit.model.trace_guard import TRACE_GUARD
from splitexit.runtime.devices import ComputeDevice, to_device
from splitexit.runtime.hop import RowResult, stamp

__all__ = ["Fallback", "fallback_stage"]


def fallback_stage(net: EarlyExitNet, edge_end: Cut, mode: str) -> Stage | None:
    """The stage that answers a request at the edge under ``mode``, with ``net``'s policy (None for ``none``,
    or a net without early exits under ``exit``)."""
    if mode == "none":
        return None
    if mode == "local":
        return net.stage(MODEL_INPUT, MODEL_OUTPUT)
    if not net.exit_cuts:
        return None
    inside = [i for i, cut in enumerate(net.exit_cuts) if cut.id <= cut_order(edge_end)]
    deepest = inside[-1] if inside else 0
    forced = list(net.policy.thresholds)
    forced[deepest] = -math.inf  # every row that reaches it leaves there
    return Stage(net, MODEL_INPUT, net.exit_cuts[deepest].id,
                 policy=net.policy.model_copy(update={"thresholds": tuple(forced)}))


class Fallback:
    """Answers one input at the edge with ``stage`` (from :func:`fallback_stage`) on ``device``."""

    def __init__(self, stage: Stage, device: ComputeDevice, *, node: str):
        self.stage, self.device, self.node = stage, device, node

    async def answer(self, request_id: int, sample: torch.Tensor) -> RowResult:
        return await asyncio.to_thread(self._compute, request_id, sample)

    def _compute(self, request_id: int, sample: torch.Tensor) -> RowResult:
        trace = [stamp(self.node, "compute_start")]
        with TRACE_GUARD.shared(), torch.inference_mode(), self.device.autocast():
            out = self.stage.run(to_device((sample,), self.device))
            self.device.synchronize()
        trace.append(stamp(self.node, "compute_end"))
        assert out.rows.numel() == 1, "a fallback stage answers every row it is given"
        return RowResult(request_id, int(out.exit[0]), int(out.prediction[0]), float(out.confidence[0]),
                         out.logits[0].float().cpu().tolist(), self.node, trace)
