"""A backbone's graph as JSON: how a node rebuilds a user's model without the user's code.

A user model (``file.py:factory``) traced by torch.fx is a graph of PyTorch's own parts: ``torch.nn`` leaf
layers, functions of ``torch``, ``torch.nn.functional`` and ``operator``, tensor methods (or, traced by
torch.export, ATen operators). :func:`graph_json` writes that graph with each layer's type and settings and
the shapes of its tensors, never their values; :func:`graph_from_json` rebuilds it from PyTorch's parts
alone, with every tensor zero until the stage's weights are loaded. Node order and names are kept, so cut
ids mean the same on both sides.

The JSON comes from the network, so it is read as data: every call target is looked up in an allowlist
built from PyTorch's tensor-op registry (``torch.overrides``; ATen operators through ``torch.ops.aten``);
layers must be ``torch.nn`` classes, their settings plain values; names, nesting, counts and tensor sizes
are bounded. Nothing is imported, evaluated or unpickled. A graph that needs anything else (a user
function, a hooked layer, a tensor that is not a parameter or buffer) cannot be written, and
:class:`GraphNotShippable` says why: such a stage still needs the user's code on the node.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from splitexit.errors import ModelError, PackageError

__all__ = ["GRAPH_FORMAT", "GraphNotShippable", "graph_from_json", "graph_json"]

GRAPH_FORMAT = "splitexit.graph/1"

#: Bounds on a graph read from the network.
MAX_GRAPH_CHARS = 16 << 20
MAX_NODES = 100_000
MAX_DEPTH = 12
MAX_NAME = 256
MAX_STRING = 1024
MAX_ITEMS = 4096
MAX_TENSOR_BYTES = 16 << 30  # all of the backbone's tensors together
MAX_VALUE_BYTES = 1 << 30  # any one value the graph computes, per sample
_PROBE_ROWS = 2

_NAMESPACES = (torch, torch.functional, torch.nn.functional, torch.linalg, torch.fft, torch.special)
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
              "and_", "or_", "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "not_", "getitem")
#: Tensor methods and ATen operators that take callables, touch storage or files, or print: never in a graph.
_DENIED_METHODS = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward",
                   "storage", "untyped_storage", "share_memory_", "set_", "data_ptr", "tolist", "numpy", "item",
                   "record_stream", "pin_memory", "resize_", "module_load"}
_DENIED_ATEN = {"from_file", "_print", "set_", "set", "set_data", "_cufft_set_plan_cache_max_size"}
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")  # a dotted path ("layer1.0.conv"); see _Reader.node
_DEVICE = re.compile(r"(cpu|meta|mps|cuda(:[0-9]{1,3})?)\Z")
_MODULE_BASE = frozenset(vars(nn.Module()))
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class GraphNotShippable(ModelError):
    """The graph uses something a node cannot rebuild from PyTorch alone (the message says what)."""


def _allowed_functions() -> dict[str, Callable[..., Any]]:
    tensor_ops = {f for functions in torch.overrides.get_overridable_functions().values() for f in functions}
    allowed: dict[str, Callable[..., Any]] = {}
    for namespace in _NAMESPACES:
        for name in dir(namespace):
            value = getattr(namespace, name, None)
            if not name.startswith("_") and callable(value) and _hashable(value) and value in tensor_ops:
                allowed.setdefault(f"{namespace.__name__}.{name}", value)
    allowed.update({f"operator.{name}": getattr(operator, name) for name in _OPERATORS})
    allowed["builtins.getattr"] = builtins.getattr
    allowed["torch._assert"] = torch._assert  # shape checks that vision transformers make
    return allowed


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


_FUNCTIONS = _allowed_functions()
_FUNCTION_NAMES = {id(f): name for name, f in reversed(list(_FUNCTIONS.items()))}  # first name wins
_METHODS = frozenset(name for name in dir(torch.Tensor) if not name.startswith("_") and name not in _DENIED_METHODS
                     and callable(getattr(torch.Tensor, name, None)))
#: Attributes a graph may read with ``getattr``: the tensor's plain properties.
_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "real", "imag", "layout",
                         "is_cuda", "is_floating_point", "requires_grad"})


# ---------------------------------------------------------------------------------------------- writing
def graph_json(graph_module: torch.fx.GraphModule) -> str:
    """The graph of ``graph_module`` with the types, settings and tensor shapes of what it uses, as JSON."""
    state = graph_module.state_dict()
    modules: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    nodes = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            modules[node.target] = _module_entry(graph_module.get_submodule(node.target), node.target, state)
        elif node.op == "get_attr":
            if node.target not in state:
                raise GraphNotShippable(f"node {node.name} reads {node.target!r}, a tensor that is neither a "
                                        "parameter nor a buffer of the model")
            value = graph_module.get_parameter(node.target) if _is_parameter(graph_module, node.target) else None
            tensors[node.target] = {**_tensor_entry(state[node.target]), "parameter": value is not None}
        nodes.append({"op": node.op, "name": node.name, "target": _target(node), "args": _encode(node.args, node),
                      "kwargs": {k: _encode(v, node) for k, v in node.kwargs.items()}, "scopes": _scopes(node)})
    return json.dumps({"format": GRAPH_FORMAT, "modules": modules, "tensors": tensors, "nodes": nodes},
                      sort_keys=True, separators=(",", ":"))


def _is_parameter(root: nn.Module, path: str) -> bool:
    owner, _, name = path.rpartition(".")
    return name in root.get_submodule(owner)._parameters


def _module_entry(module: nn.Module, path: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    kind = type(module)
    if getattr(nn, kind.__name__, None) is not kind:
        raise GraphNotShippable(f"layer {path!r} is a {kind.__module__}.{kind.__qualname__}, which is not a torch.nn "
                                "layer (only torch.nn layers can be rebuilt without the model's code)")
    hooks = [name for name in vars(module) if "hook" in name and getattr(module, name)]
    if hooks:
        raise GraphNotShippable(f"layer {path!r} has hooks ({', '.join(hooks)}): they are code the node lacks")
    if any(name in module._non_persistent_buffers_set for name in module._buffers):
        raise GraphNotShippable(f"layer {path!r} has buffers that are not saved with its weights")
    settings = {name: _plain(value, f"{path}.{name}") for name, value in vars(module).items()
                if name not in _MODULE_BASE}
    parameters = {name: None if value is None else _tensor_entry(value) for name, value in module._parameters.items()}
    buffers = {name: None if value is None else _tensor_entry(value) for name, value in module._buffers.items()}
    children = {name: _module_entry(child, f"{path}.{name}", state) for name, child in module._modules.items()
                if child is not None}
    return {"type": kind.__name__, "settings": settings, "parameters": parameters, "buffers": buffers,
            "children": children}


def _tensor_entry(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _target(node: torch.fx.Node) -> str:
    if node.op in ("placeholder", "output", "get_attr", "call_module", "call_method"):
        if node.op == "call_method" and node.target not in _METHODS:
            raise GraphNotShippable(f"node {node.name} calls the tensor method {node.target!r}, which nodes refuse")
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._opname}.{target._overloadname}"
    name = _FUNCTION_NAMES.get(id(target))
    if name is None:
        where = getattr(target, "__module__", None) or "?"
        raise GraphNotShippable(f"node {node.name} calls {where}.{getattr(target, '__qualname__', target)}, which is "
                                "not a PyTorch tensor operation (a function of the model's own code?)")
    return name


def _scopes(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def _encode(value: Any, node: torch.fx.Node) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, node) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, node) for k, v in value.items()}}
    return _plain(value, f"an argument of node {node.name}")


def _plain(value: Any, where: str) -> Any:
    """A setting or constant as JSON: numbers, strings, None, dtypes, devices, slices, tuples and lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, (tuple, list)):
        return {"tuple" if isinstance(value, tuple) else "list": [_plain(v, where) for v in value]}
    if isinstance(value, slice):
        return {"slice": [_plain(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.memory_format, torch.layout)):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    raise GraphNotShippable(f"{where} is a {type(value).__name__}, which a graph cannot carry")


# ---------------------------------------------------------------------------------------------- reading
def graph_from_json(text: str, *, where: str, input_shape: tuple[int, ...], input_dtype: torch.dtype
                    ) -> torch.fx.GraphModule:
    """The graph module ``text`` describes, every tensor zero; PackageError (naming ``where``) if it is not
    one this module wrote, asks for anything outside the allowlist, or makes a value over MAX_VALUE_BYTES
    per sample from an input of ``input_shape`` (checked on the meta device before anything is allocated)."""
    try:
        graph_module = _Reader(where).read(text)
        _check_sizes(graph_module, input_shape, input_dtype, where)
    except PackageError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a malformed graph breaks, the node refuses it and stays up
        detail = f"{type(exc).__name__}: {exc}"[:400]
        raise PackageError(f"{where} carries a graph that cannot be rebuilt: {detail}") from exc
    graph_module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in (*graph_module.parameters(), *graph_module.buffers()):
            tensor.zero_()
    return graph_module


def _check_sizes(graph_module: torch.fx.GraphModule, input_shape: tuple[int, ...], input_dtype: torch.dtype,
                 where: str) -> None:
    """Run the graph on the meta device (shapes only, nothing allocated) and refuse any value too large."""
    limit = MAX_VALUE_BYTES * _PROBE_ROWS

    class _Sizes(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:  # noqa: ANN401 - torch.fx signature
            result = super().run_node(n)
            for value in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(value, torch.Tensor) and value.numel() * value.element_size() > limit:
                    raise PackageError(f"{where} carries a graph the node refuses: node {n.name} makes a tensor of "
                                       f"{tuple(value.shape)}, over {MAX_VALUE_BYTES >> 20} MiB per sample")
            return result

    with torch.no_grad():
        _Sizes(graph_module).run(torch.empty((_PROBE_ROWS, *input_shape), dtype=input_dtype, device="meta"))


class _Reader:
    def __init__(self, where: str):
        self.where = where
        self.tensor_bytes = 0

    def refuse(self, why: str) -> PackageError:
        return PackageError(f"{self.where} carries a graph the node refuses: {why}"[:600])

    def read(self, text: str) -> torch.fx.GraphModule:
        if len(text) > MAX_GRAPH_CHARS:
            raise self.refuse(f"{len(text)} characters, over the limit of {MAX_GRAPH_CHARS}")
        about = json.loads(text)
        if not isinstance(about, dict) or about.get("format") != GRAPH_FORMAT:
            raise self.refuse(f"its format is not {GRAPH_FORMAT}")
        modules, tensors = self.mapping(about.get("modules")), self.mapping(about.get("tensors"))
        nodes = about.get("nodes")
        if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
            raise self.refuse(f"it needs 1..{MAX_NODES} nodes")
        root = nn.Module()
        for path, entry in modules.items():
            _place(root, self.name(path), self.module(self.mapping(entry), path, 0))
        for path, entry in tensors.items():
            entry = self.mapping(entry)
            tensor = self.tensor(entry, path)
            owner, _, name = self.name(path).rpartition(".")
            holder = _holder(root, owner)
            if entry.get("parameter") is True:
                holder.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                holder.register_buffer(name, tensor)
        graph = torch.fx.Graph()
        made: dict[str, torch.fx.Node] = {}
        for raw in nodes:
            entry = self.mapping(raw)
            node = self.node(graph, entry, made, modules, tensors)
            node.meta["nn_module_stack"] = {path: (path, None) for path in self.names(entry.get("scopes", []))}
            made[node.name] = node
        graph.lint()
        return torch.fx.GraphModule(root, graph, class_name="ShippedGraph")

    def node(self, graph: torch.fx.Graph, entry: dict, made: dict[str, torch.fx.Node], modules: dict,
             tensors: dict) -> torch.fx.Node:
        op, name, target = entry.get("op"), self.name(entry.get("name")), entry.get("target")
        if name in made:
            raise self.refuse(f"node {name!r} appears twice")
        args = self.value(entry.get("args"), made, 0)
        kwargs = {self.identifier(k): self.value(v, made, 0)
                  for k, v in self.mapping(entry.get("kwargs", {})).items()}
        if not isinstance(args, tuple):
            raise self.refuse(f"node {name!r} has arguments that are not a tuple")
        resolved: Any
        if op in ("placeholder", "output"):
            resolved = self.identifier(target)
        elif op in ("get_attr", "call_module"):
            resolved = self.name(target)
            if resolved not in (tensors if op == "get_attr" else modules):
                raise self.refuse(f"node {name!r} uses {resolved!r}, which the graph does not declare")
        elif op == "call_method":
            resolved = self.name(target)
            if resolved not in _METHODS:
                raise self.refuse(f"node {name!r} calls the method {resolved!r}, which is not an allowed tensor method")
            if not args or not isinstance(args[0], torch.fx.Node):
                raise self.refuse(f"node {name!r} calls {resolved!r} on something the graph did not compute")
        elif op == "call_function":
            resolved = self.function(target, name)
            if resolved is builtins.getattr and (len(args) != 2 or args[1] not in _ATTRIBUTES):
                raise self.refuse(f"node {name!r} reads an attribute outside {sorted(_ATTRIBUTES)}")
        else:
            raise self.refuse(f"node {name!r} has the unknown op {op!r}")
        node = graph.create_node(op, resolved, args, kwargs, name=name)
        if node.name != name:
            raise self.refuse(f"node name {name!r} is not usable")
        return node

    def function(self, target: object, node: str) -> Callable[..., Any]:
        if not isinstance(target, str):
            raise self.refuse(f"node {node!r} has a target that is not a name")
        if target.startswith("aten."):
            parts = target.split(".")
            if len(parts) != 3 or parts[1] in _DENIED_ATEN or not all(p.isidentifier() for p in parts[1:]):
                raise self.refuse(f"node {node!r} calls the ATen operator {target!r}, which nodes refuse")
            packet = getattr(torch.ops.aten, parts[1], None)
            overload = getattr(packet, parts[2], None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
            if not isinstance(overload, torch._ops.OpOverload):
                raise self.refuse(f"node {node!r} calls {target!r}, which is not an ATen operator here")
            return overload
        if target not in _FUNCTIONS:
            raise self.refuse(f"node {node!r} calls {target[:MAX_NAME]!r}, which is not an allowed tensor operation")
        return _FUNCTIONS[target]

    def module(self, entry: dict, path: str, depth: int) -> nn.Module:
        kind = entry.get("type")
        cls = getattr(nn, kind, None) if isinstance(kind, str) and kind.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.")):
            raise self.refuse(f"layer {path!r} has type {str(kind)[:MAX_NAME]!r}, which is not a torch.nn layer")
        if depth > MAX_DEPTH:
            raise self.refuse(f"layer {path!r} nests deeper than {MAX_DEPTH}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name, value in self.mapping(entry.get("settings", {})).items():
            if not name.isidentifier() or name.startswith("__") or name in _MODULE_BASE:
                raise self.refuse(f"layer {path!r} has the setting {name[:MAX_NAME]!r}")
            setattr(module, name, self.value(value, {}, 0))
        for name, tensor in self.mapping(entry.get("parameters", {})).items():
            value = None if tensor is None else nn.Parameter(self.tensor(self.mapping(tensor), path), False)
            module.register_parameter(self.identifier(name), value)
        for name, tensor in self.mapping(entry.get("buffers", {})).items():
            module.register_buffer(self.identifier(name), None if tensor is None else
                                   self.tensor(self.mapping(tensor), path))
        for name, child in self.mapping(entry.get("children", {})).items():
            module.add_module(self.identifier(name), self.module(self.mapping(child), f"{path}.{name}", depth + 1))
        return module.eval()

    def tensor(self, entry: dict, where: str) -> torch.Tensor:
        shape, dtype = entry.get("shape"), _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None or not isinstance(shape, list) or len(shape) > 8 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 32 for d in shape):
            raise self.refuse(f"a tensor of {where!r} has the shape {str(shape)[:80]} and dtype {entry.get('dtype')!r}")
        self.tensor_bytes += math.prod(shape) * dtype.itemsize
        if self.tensor_bytes > MAX_TENSOR_BYTES:
            raise self.refuse(f"its tensors add up to more than {MAX_TENSOR_BYTES >> 30} GiB")
        return torch.empty(shape, dtype=dtype, device="meta")  # sizes are checked before anything is allocated

    def value(self, raw: Any, made: dict[str, torch.fx.Node], depth: int) -> Any:
        if raw is None or isinstance(raw, (bool, int, float)):
            return raw
        if isinstance(raw, str):
            if len(raw) > MAX_STRING:
                raise self.refuse(f"a string of {len(raw)} characters")
            return raw
        if depth > MAX_DEPTH or not isinstance(raw, dict) or len(raw) != 1:
            raise self.refuse(f"a value it cannot read: {str(raw)[:80]}")
        ((tag, inner),) = raw.items()
        if tag in ("tuple", "list", "slice"):
            if not isinstance(inner, list) or len(inner) > MAX_ITEMS or (tag == "slice" and len(inner) != 3):
                raise self.refuse(f"a {tag} it cannot read")
            items = [self.value(v, made, depth + 1) for v in inner]
            return tuple(items) if tag == "tuple" else slice(*items) if tag == "slice" else items
        if tag == "dict":
            return {self.identifier(k): self.value(v, made, depth + 1) for k, v in self.mapping(inner).items()}
        if tag == "node":
            if inner not in made:
                raise self.refuse(f"a use of {str(inner)[:MAX_NAME]!r} before it is made")
            return made[inner]
        return self.constant(tag, inner)

    def constant(self, tag: str, inner: Any) -> Any:
        if tag == "float" and inner in ("inf", "-inf", "nan"):
            return float(inner)
        if tag == "ellipsis" and inner is True:
            return Ellipsis
        if tag == "dtype" and inner in _DTYPES:
            return _DTYPES[inner]
        if tag == "device" and isinstance(inner, str) and _DEVICE.match(inner):
            return torch.device(inner)
        if tag in ("memory_format", "layout") and isinstance(inner, str) and inner.isidentifier():
            value = getattr(torch, inner, None)
            if isinstance(value, torch.memory_format if tag == "memory_format" else torch.layout):
                return value
        raise self.refuse(f"a {str(tag)[:40]} constant it cannot read: {str(inner)[:80]}")

    def mapping(self, raw: Any) -> dict:
        if not isinstance(raw, dict) or len(raw) > MAX_NODES:
            raise self.refuse(f"a part that should be a mapping is {type(raw).__name__}")
        return raw

    def name(self, raw: Any) -> str:
        if not isinstance(raw, str) or len(raw) > MAX_NAME or not _NAME.match(raw):
            raise self.refuse(f"the name {str(raw)[:MAX_NAME]!r}")
        return raw

    def identifier(self, raw: Any) -> str:
        if not isinstance(raw, str) or len(raw) > MAX_NAME or not raw.isidentifier() or raw.startswith("__"):
            raise self.refuse(f"the name {str(raw)[:MAX_NAME]!r}")
        return raw

    def names(self, raw: Any) -> list[str]:
        if not isinstance(raw, list) or len(raw) > MAX_DEPTH * 4:
            raise self.refuse("a node's scopes are not a short list of names")
        return [self.name(path) for path in raw]


def _holder(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` under ``root``, made (empty) where it does not exist yet."""
    module = root
    for part in filter(None, path.split(".")):
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]  # type: ignore[assignment]
    return module


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    _holder(root, owner).add_module(name, module)
