"""Turn a model into a graph, list the places it can be cut, and extract the segment between two cuts.

A *cut point* sits after one compute node in the graph's topological order. The tensors that cross it
are every value produced at or before it and used after it: usually one, several across skip connections
and concatenations. Segments are ``GraphModule``\\ s that take the tensors crossing their start cut and
return the tensors crossing their end cut, so chaining every segment reproduces the model exactly.

Tracing uses ``torch.fx`` and falls back to ``torch.export`` (with a dynamic batch dimension) for models
fx cannot follow. Models are always traced in eval mode: a functional ``training`` flag is baked into the
graph at trace time, and inference must never see a training-mode branch.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Boundary, Cut, cut_label
from splitexit.errors import CutError, ModelError, TraceError
from splitexit.model.flops import count_flops
from splitexit.model.trace_guard import TRACE_GUARD
from splitexit.tensors import TensorInfo

__all__ = ["CutPoint", "ModelGraph", "list_cut_points", "run_chain", "trace_model"]

logger = logging.getLogger(__name__)

#: Batch size used for the shape-propagation dry run; 2 so the batch dimension can be told apart.
PROBE_BATCH = 2
#: An automatic exit must leave at least this much of the model's compute to save (an exit after 99% of
#: the FLOPs costs a head and saves nothing).
MAX_AUTO_EXIT_FRACTION = 0.9

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LayerNorm,
)
_ACTIVATION_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu,
                         torch.nn.functional.silu, torch.nn.functional.max_pool2d}


@dataclass(frozen=True)
class CutPoint:
    """A place the model can be cut: after compute node number ``id`` (0-based, topological order)."""

    id: int
    after: str  # name of the fx node just before the cut
    ends_modules: tuple[str, ...]  # modules whose last node is ``after`` (outermost first)
    tensors: tuple[TensorInfo, ...]  # what crosses the cut
    flops_before: int  # per-sample FLOPs of every node up to and including ``after``

    @property
    def bytes_per_sample(self) -> int:
        return sum(t.bytes_per_sample for t in self.tensors)

    @property
    def can_carry_exit(self) -> bool:
        """An exit head needs exactly one tensor with at least one feature dimension."""
        return len(self.tensors) == 1 and len(self.tensors[0].shape) >= 1

    def describe(self) -> str:
        where = self.ends_modules[0] if self.ends_modules else self.after
        shapes = ", ".join("x".join(map(str, t.shape)) for t in self.tensors)
        return f"cut {self.id} after {where} ({shapes})"


class ModelGraph:
    """A traced model: its compute nodes in order, its cut points, and segment extraction."""

    def __init__(self, graph_module: torch.fx.GraphModule, example_input: torch.Tensor, *, tracer: str):
        self.graph_module = graph_module
        self.tracer = tracer
        self._nodes = [n for n in graph_module.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
        self._position = {n: i for i, n in enumerate(self._nodes)}
        self._placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self._output = next(n for n in graph_module.graph.nodes if n.op == "output")
        for n in self._placeholders:
            self._position[n] = -1
        self._position[self._output] = len(self._nodes)
        self._last_use = {n: max((self._position[u] for u in n.users), default=-1)
                          for n in [*self._placeholders, *self._nodes]}
        with TRACE_GUARD.shared():  # the probe runs modules: not while another thread traces (trace_guard.py)
            self._node_flops, self._values = _probe(graph_module, example_input)
        self.total_flops = sum(self._node_flops.values())
        self.cut_points = self._find_cut_points()
        self._cut_by_id = {c.id: c for c in self.cut_points}

    # ------------------------------------------------------------------ discovery
    def crossing(self, cut_id: int) -> list[torch.fx.Node]:
        """Values produced at or before node ``cut_id`` and used after it, in production order."""
        return [n for n in [*self._placeholders, *self._nodes[: cut_id + 1]] if self._last_use[n] > cut_id]

    def crossing_info(self, cut_id: int) -> tuple[TensorInfo, ...]:
        """Per-sample shapes and dtypes of the tensors crossing a cut, in the order segments take them."""
        return self.cut(cut_id).tensors

    def cut(self, cut_id: int) -> CutPoint:
        if cut_id not in self._cut_by_id:
            raise CutError(
                f"cut {cut_id} does not exist: valid cut ids are 0..{len(self._nodes) - 2} where every tensor "
                f"crossing has the batch as its first dimension. Run `splitexit cuts` to list them."
            )
        return self._cut_by_id[cut_id]

    def resolve(self, location: int | str) -> CutPoint:
        """Find the cut for an exit named by cut id, module path (``layer2``) or fx node name."""
        if isinstance(location, int) or (isinstance(location, str) and location.lstrip("-").isdigit()):
            return self.cut(int(location))
        ends = [c for c in self.cut_points if location in c.ends_modules or c.after == location]
        if ends:
            return ends[-1]
        scoped = [i for i, n in enumerate(self._nodes) if location in _scopes(n)]
        if scoped and scoped[-1] in self._cut_by_id:
            return self._cut_by_id[scoped[-1]]
        if scoped:
            raise CutError(f"module {location!r} ends where no valid cut exists (a non-tensor value or a "
                           f"tensor without a batch dimension crosses there); pick another module or a cut id "
                           f"from `splitexit cuts`.")
        modules = sorted({m for c in self.cut_points for m in c.ends_modules if m.count(".") <= 1})
        raise CutError(f"no module or node named {location!r} in the model. Modules that end at a cut include: "
                       f"{', '.join(modules[:30]) or '(none)'}. Run `splitexit cuts` for the full list.")

    def auto_exits(self, count: int) -> list[CutPoint]:
        """Pick up to ``count`` exit cuts spread evenly by FLOPs, preferring ends of blocks and activations."""
        candidates = [c for c in self.cut_points
                      if c.can_carry_exit and 0 < c.flops_before <= MAX_AUTO_EXIT_FRACTION * self.total_flops]
        chosen: list[CutPoint] = []
        for k in range(1, count + 1):
            target = k / (count + 1)
            best = min(
                (c for c in candidates if not chosen or c.id > chosen[-1].id),
                key=lambda c: abs(c.flops_before / self.total_flops - target) + self._cut_penalty(c),
                default=None,
            )
            if best is not None:
                chosen.append(best)
        return chosen

    def _cut_penalty(self, cut: CutPoint) -> float:
        """Small preference for cuts after whole blocks, then after activations/pooling, over mid-layer cuts."""
        node = self._nodes[cut.id]
        module = self.graph_module.get_submodule(node.target) if node.op == "call_module" else None
        if any(_is_block(self._maybe_module(m)) for m in cut.ends_modules):
            return 0.0
        if isinstance(module, _ACTIVATIONS) or node.target in _ACTIVATION_FUNCTIONS:
            return 0.03
        return 0.10

    def _maybe_module(self, path: str) -> nn.Module | None:
        try:
            return self.graph_module.get_submodule(path) if path else None
        except AttributeError:
            return None

    # ------------------------------------------------------------------ cutting
    def segment(self, start: Cut, end: Cut) -> torch.fx.GraphModule:
        """The part of the model between two cuts.

        It takes the tensors crossing ``start`` as positional arguments, in the order ``crossing(start)``
        lists them (at the model input: the model's own inputs), and returns a tuple of the tensors crossing
        ``end`` (at the model output: what the model returns).
        """
        first = -1 if start is MODEL_INPUT else self.cut(_cut_id(start)).id
        last = len(self._nodes) - 1 if end is MODEL_OUTPUT else self.cut(_cut_id(end)).id
        if last <= first:
            raise CutError(f"the segment from {cut_label(start)} to {cut_label(end)} is empty: the end must come "
                           "after the start.")
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs = self._placeholders if start is MODEL_INPUT else self.crossing(first)
        for value in inputs:
            env[value] = graph.placeholder(value.name)

        def lookup(node: torch.fx.Node) -> torch.fx.Node:
            if node not in env:
                if node.op != "get_attr":
                    raise ModelError(f"internal: node {node.name} used by the segment is not available")
                env[node] = graph.node_copy(node)
            return env[node]

        for node in self._nodes[first + 1: last + 1]:
            env[node] = graph.node_copy(node, lookup)
        if end is MODEL_OUTPUT:
            graph.output(torch.fx.map_arg(self._output.args[0], lookup))
        else:
            graph.output(tuple(env[v] for v in self.crossing(last)))
        graph.lint()
        return torch.fx.GraphModule(self.graph_module, graph, class_name=f"Segment_{first + 1}_{last}")

    # ------------------------------------------------------------------ internals
    def _find_cut_points(self) -> list[CutPoint]:
        cuts: list[CutPoint] = []
        flops_so_far = 0
        for i, node in enumerate(self._nodes[:-1]):
            flops_so_far += self._node_flops.get(node, 0)
            crossing = self.crossing(i)
            infos = [info for info in map(self._tensor_info, crossing) if info is not None]
            if not crossing or len(infos) != len(crossing):
                continue
            ends = tuple(sorted(set(_scopes(node)) - set(_scopes(self._nodes[i + 1])), key=lambda m: m.count(".")))
            cuts.append(CutPoint(id=i, after=node.name, ends_modules=ends,
                                 tensors=tuple(infos), flops_before=flops_so_far))
        return cuts

    def _tensor_info(self, node: torch.fx.Node) -> TensorInfo | None:
        value = self._values.get(node)
        if not isinstance(value, tuple) or len(value) != 2:
            return None
        shape, dtype = value
        if len(shape) == 0 or shape[0] != PROBE_BATCH:
            return None
        return TensorInfo(name=node.name, shape=tuple(shape[1:]), dtype=dtype)


def _cut_id(cut: Cut) -> int:
    if isinstance(cut, Boundary):
        raise CutError(f"a segment cannot start at the model output or end at its input (got {cut.value})")
    return cut


def _scopes(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def _is_block(module: nn.Module | None) -> bool:
    """A module with children (a block such as ``layer2`` or ``features.4``), not a leaf layer."""
    return module is not None and any(True for _ in module.children())


def _probe(gm: torch.fx.GraphModule, example: torch.Tensor) -> tuple[dict, dict]:
    """Run the graph once at PROBE_BATCH, recording per-sample FLOPs and (shape, dtype) of every value."""
    flops: dict[torch.fx.Node, int] = {}
    values: dict[torch.fx.Node, object] = {}

    class _Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node):  # noqa: ANN201 - torch.fx signature
            if n.op in ("placeholder", "get_attr", "output"):
                result = super().run_node(n)
            else:
                result, node_flops = count_flops(lambda: super(_Probe, self).run_node(n))
                flops[n] = node_flops // PROBE_BATCH
            values[n] = (tuple(result.shape), result.dtype) if isinstance(result, torch.Tensor) else None
            return result

    batch = _batch_of(example, PROBE_BATCH)
    try:
        with torch.no_grad():
            _Probe(gm).run(batch)
    except Exception as exc:  # noqa: BLE001 - the user's model failed on the example: one line, not torch's trace
        failed = next((n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n not in values), None)
        where = "" if failed is None else \
            f" in module {failed.target!r}" if failed.op == "call_module" else f" at {failed.name}"
        raise TraceError(f"the model cannot run on one input of shape {tuple(example.shape[1:])} "
                         f"({example.dtype}){where}: {_first_line(exc)}. Does it expect another input shape, e.g. "
                         "another number of channels or image size than the data gives?") from exc
    return flops, values


def _batch_of(example: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of ``size`` rows built from an example (with or without a batch dimension of 1)."""
    return example[:1].expand(size, *example.shape[1:]).contiguous()


def trace_model(model: nn.Module, example_input: torch.Tensor) -> ModelGraph:
    """Trace ``model`` (in eval mode) with torch.fx, falling back to torch.export, and find its cut points.

    ``example_input`` is one input batch (its first dimension is the batch); only its shape and dtype
    matter.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise ModelError("example_input must be a tensor whose first dimension is the batch, e.g. "
                         "torch.randn(1, 3, 224, 224).")
    was_training = model.training
    model.eval()
    try:
        with TRACE_GUARD.exclusive():  # tracing patches every module's __call__ in the process (trace_guard.py)
            graph_module, tracer = _trace(model, example_input)
        return ModelGraph(graph_module, example_input, tracer=tracer)
    finally:
        model.train(was_training)


def list_cut_points(model: nn.Module, example_input: torch.Tensor) -> list[CutPoint]:
    """Every place ``model`` can be cut, with the tensors (shapes, bytes) that cross each one."""
    return trace_model(model, example_input).cut_points


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, str]:
    try:
        return torch.fx.symbolic_trace(model), "fx"
    except Exception as fx_error:  # noqa: BLE001 - any fx failure sends us to the fallback
        logger.info("torch.fx could not trace %s (%s); trying torch.export", type(model).__name__, fx_error)
        fx_reason = _user_frame(fx_error)
    try:
        return _export(model, example), "export"
    except Exception as export_error:  # noqa: BLE001 - both failed: explain in our terms
        raise TraceError(
            f"cannot turn {type(model).__name__} into a graph.\n"
            f"  torch.fx stopped at {fx_reason}\n"
            f"  torch.export stopped with: {_first_line(export_error)}\n"
            "Usually the forward uses a tensor's value in Python control flow (`if x.sum() > 0:`). Try: "
            "replace the branch with torch.where, move it into a submodule and register that as a leaf, or "
            "make the decision from shapes or constructor arguments instead of tensor values."
        ) from export_error


def _export(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (_batch_of(example, PROBE_BATCH),), dynamic_shapes=({0: batch},))
    graph_module = program.module()
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards") and not node.users:
            graph.erase_node(node)
    # export flattens outputs into a tuple and wraps forward in pytree (un)flattening; we want plain
    # `forward(x) -> logits`, like an fx trace, so segments and the net see the same thing either way.
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        output.args = (result[0],)
    graph._codegen = torch.fx.graph.CodeGen()
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _user_frame(error: BaseException) -> str:
    """The innermost traceback frame outside torch, i.e. the user's line that fx could not follow."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    reason = _first_line(error)
    if not frames:
        return reason
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`: {reason}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_chain(segments: Sequence[Callable[..., Any]], x: torch.Tensor) -> object:
    """Run segments one after another, feeding each the tuple the previous one returned."""
    values: Any = (x,)  # each segment returns the tuple of tensors crossing its end cut
    for seg in segments:
        values = seg(*values)
    return values
