"""EarlyExitNet: a model cut into segments, with an exit head at the end of every segment but the last.

Training calls the net (every exit's logits at once). Inference calls :meth:`EarlyExitNet.infer`, which
routes each sample on its own: after each segment the exit head scores the whole batch, confident rows
leave with their answer, and only the remaining rows run on (compacted, so later segments see a
smaller batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from splitexit.config import CpuSettings, ExitPolicy, ModelSource
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut
from splitexit.errors import ConfigError, CutError, ModelError
from splitexit.model.flops import flops_per_sample
from splitexit.model.graph import CutPoint, ModelGraph, trace_model
from splitexit.model.heads import build_head, confidence_function
from splitexit.model.stages import Stage
from splitexit.model.trace_guard import TRACE_GUARD
from splitexit.tensors import TensorInfo

__all__ = ["EarlyExitNet", "InferenceResult", "ExitLocation"]

#: How many early exits `exits="auto"` places.
DEFAULT_AUTO_EXITS = 3

ExitLocation = int | str


@dataclass(frozen=True)
class InferenceResult:
    """Per-sample answers of :meth:`EarlyExitNet.infer`; row ``i`` belongs to input row ``i``."""

    prediction: torch.Tensor  # (B,) int64 class index
    exit: torch.Tensor  # (B,) int64 exit index; ``net.num_exits - 1`` is the final exit
    confidence: torch.Tensor  # (B,) float32 score under the net's confidence function
    logits: torch.Tensor  # (B, C) float32 logits of the exit that answered (before temperature)

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    def rows(self) -> Iterator[dict[str, float | int]]:
        for i in range(len(self)):
            yield {"prediction": int(self.prediction[i]), "exit": int(self.exit[i]),
                   "confidence": float(self.confidence[i])}


class EarlyExitNet(nn.Module):
    """Segments of a traced model plus one exit head per early exit.

    Build one with :meth:`from_model`; ``net(x)`` returns a list of logits, one per exit, the last being
    exactly the original model's output; ``net.infer(x)`` answers each sample at its first confident exit.
    """

    #: The CPU settings the package was tuned with (an attribute that hides ``nn.Module.cpu()``).
    cpu: CpuSettings  # type: ignore[assignment]  # shadows nn.Module.cpu(), which nothing here calls

    def __init__(self, graph: ModelGraph, exit_cuts: Sequence[CutPoint], *, num_classes: int,
                 input_shape: tuple[int, ...], input_dtype: torch.dtype = torch.float32,
                 heads: str | Sequence[str] = "auto",
                 policy: ExitPolicy | None = None, source: ModelSource | None = None):
        super().__init__()
        self.graph = graph
        self.exit_cuts = list(exit_cuts)
        self.head_names = [heads] * len(self.exit_cuts) if isinstance(heads, str) else list(heads)
        if len(self.head_names) != len(self.exit_cuts):
            raise ConfigError(f"{len(self.head_names)} head names for {len(self.exit_cuts)} exits")
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype
        #: sha256 of the weights file this net was last saved to or loaded from ("" if never): nodes and
        #: the entry put it into the plan version, so they refuse to work with a different package.
        self.weights_sha256 = ""
        self.source = source
        self.cpu = CpuSettings()
        bounds: list[Cut] = [MODEL_INPUT, *[c.id for c in self.exit_cuts], MODEL_OUTPUT]
        self.segments = nn.ModuleList(graph.segment(a, b) for a, b in zip(bounds[:-1], bounds[1:]))
        # plain dicts (not submodules): the cached segments share their layers with `segments`
        self._segment_cache: dict[tuple[Cut, Cut], nn.Module] = dict(
            zip(zip(bounds[:-1], bounds[1:]), self.segments))
        self._stages: dict[tuple[Cut, Cut], Stage] = {}
        self.heads = nn.ModuleList(build_head(name, c.tensors[0].shape, num_classes)
                                   for name, c in zip(self.head_names, self.exit_cuts))
        self.policy = policy or ExitPolicy.uncalibrated(len(self.exit_cuts))
        self.segment_flops = self._segment_flops()
        self.head_flops = [flops_per_sample(h.eval(), torch.zeros(1, *c.tensors[0].shape))
                           for h, c in zip(self.heads, self.exit_cuts)]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, example_input: torch.Tensor, exits: str | Sequence[ExitLocation] = "auto",
                   *, num_exits: int = DEFAULT_AUTO_EXITS, head: str | Sequence[str] = "auto",
                   confidence: str = "max_softmax",
                   source: ModelSource | None = None) -> EarlyExitNet:
        """Trace ``model`` and attach exit heads.

        ``exits`` is ``"auto"`` (``num_exits`` exits spread by FLOPs) or a list of locations: cut ids,
        module paths such as ``"layer2"``, or fx node names. ``head`` names one registered head builder
        for every exit, or one per exit (see :func:`splitexit.register_head`). ``source`` records how to
        rebuild the backbone, which :func:`splitexit.save` needs.
        """
        graph = trace_model(model, example_input)
        if exits == "auto":
            cuts = graph.auto_exits(num_exits)
            if not cuts:
                raise CutError(f"{type(model).__name__} has no cut where a single batched tensor crosses, so "
                               "no exit can be placed automatically; name exits by cut id (`splitexit cuts`).")
        elif isinstance(exits, str):
            raise ConfigError(f"exits must be 'auto' or a list of cut ids / module names, got {exits!r}")
        else:
            cuts = [graph.resolve(location) for location in exits]
            for location, cut in zip(exits, cuts):
                if not cut.can_carry_exit:
                    raise CutError(f"exit {location!r} ({cut.describe()}) has {len(cut.tensors)} tensors crossing; "
                                   "an exit head needs exactly one. Pick the end of a block instead.")
            ids = [c.id for c in cuts]
            if ids != sorted(set(ids)):
                raise CutError(f"exits must be distinct and in forward order; they resolve to cuts {ids}")
        num_classes = output_classes(graph, example_input)
        policy = ExitPolicy.uncalibrated(len(cuts), confidence=confidence)
        confidence_function(confidence)  # fail now, not at the first infer()
        return cls(graph, cuts, num_classes=num_classes, input_shape=tuple(example_input.shape[1:]),
                   input_dtype=example_input.dtype, heads=head,
                   policy=policy, source=source)

    # ------------------------------------------------------------------ properties
    @property
    def num_exits(self) -> int:
        """Early exits plus the final one."""
        return len(self.exit_cuts) + 1

    @property
    def total_flops(self) -> int:
        """Per-sample FLOPs of the original model (no heads)."""
        return self.graph.total_flops

    def exit_names(self) -> list[str]:
        """A readable location per exit: the outermost module that ends at its cut, then "final"."""
        names = [c.ends_modules[0] if c.ends_modules else c.after for c in self.exit_cuts]
        return [*names, "final"]

    def exit_costs(self) -> list[int]:
        """Per-sample FLOPs spent by a sample that leaves at exit i: its segments and every head it met."""
        costs, spent = [], 0
        for i, segment_cost in enumerate(self.segment_flops):
            spent += segment_cost + (self.head_flops[i] if i < len(self.head_flops) else 0)
            costs.append(spent)
        return costs

    def set_policy(self, policy: ExitPolicy) -> None:
        if len(policy.thresholds) != len(self.exit_cuts):
            raise ConfigError(f"policy has {len(policy.thresholds)} thresholds; this net has "
                              f"{len(self.exit_cuts)} early exits")
        confidence_function(policy.confidence)
        self.policy = policy

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit for every sample (training and evaluation); the last is the model's output."""
        outputs: list[torch.Tensor] = []
        values: tuple[torch.Tensor, ...] = (self._prepare(x),)
        for i, segment in enumerate(self.segments):
            result = segment(*values)
            if i < len(self.heads):
                values = result
                outputs.append(self.heads[i](values[0]))
            else:
                outputs.append(result)
        return outputs

    def infer(self, x: torch.Tensor, *, confidence: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> InferenceResult:
        """Answer each sample at its first confident exit (eval mode, inference mode, per-row routing).

        ``confidence`` overrides the policy's confidence function for this call.
        """
        score = confidence or confidence_function(self.policy.confidence)
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.inference_mode():
                return self._route(self._prepare(x), score)
        finally:
            if was_training:
                self.train()

    def _route(self, x: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> InferenceResult:
        out = self.stage(MODEL_INPUT, MODEL_OUTPUT).run((x,), score)
        if out.rows.numel() > 1 and bool((out.rows[1:] < out.rows[:-1]).any()):
            order = torch.argsort(out.rows)
            return InferenceResult(out.prediction[order], out.exit[order], out.confidence[order], out.logits[order])
        return InferenceResult(out.prediction, out.exit, out.confidence, out.logits)

    def stage(self, start: Cut, end: Cut) -> Stage:
        """The compute between two cuts with the exits inside, for serving."""
        key = (start, end)
        if key not in self._stages:
            self._stages[key] = Stage(self, start, end)
        return self._stages[key]

    @property
    def input_info(self) -> TensorInfo:
        """The model input, per sample, as it crosses the wire when the edge forwards it unprocessed."""
        return TensorInfo("input", tuple(self.input_shape), self.input_dtype)

    def segment_between(self, start: Cut, end: Cut) -> torch.nn.Module:
        """The graph segment between two cuts, shared with the net's own segments where they coincide."""
        key = (start, end)
        if key not in self._segment_cache:
            self._segment_cache[key] = self.graph.segment(start, end)
        return self._segment_cache[key]

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu.memory_format == "channels_last" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _segment_flops(self) -> list[int]:
        edges = [0, *[c.flops_before for c in self.exit_cuts], self.graph.total_flops]
        return [b - a for a, b in zip(edges[:-1], edges[1:])]


def output_classes(graph: ModelGraph, example: torch.Tensor) -> int:
    """Number of classes from the model's output on one sample; the output must be one (B, C) tensor."""
    with torch.no_grad(), TRACE_GUARD.shared():  # runs modules: not while another thread traces
        output = graph.graph_module(example[:1])
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        kind = type(output).__name__ if not isinstance(output, torch.Tensor) \
            else f"tensor of shape {tuple(output.shape)}"
        raise ModelError(f"splitexit needs a classifier returning one (batch, classes) tensor; the model returned "
                         f"a {kind}. Wrap it in a module that returns the logits.")
    return int(output.shape[1])

