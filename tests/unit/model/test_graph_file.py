"""A backbone's graph as JSON: it rebuilds the same model from PyTorch alone, and a hostile graph is refused
before anything it names is called or allocated."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from splitexit import build_model
from splitexit.errors import PackageError
from splitexit.model.graph import trace_model
from splitexit.model.graph_file import GraphNotShippable, graph_from_json, graph_json

USER_MODELS = Path(__file__).parents[2] / "assets" / "models.py"
DIGIT = (1, 8, 8)


def shipped(model: nn.Module, shape: tuple[int, ...]) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The traced graph of ``model`` and the one rebuilt from its JSON, with the same weights loaded."""
    torch.manual_seed(0)
    traced = trace_model(model.eval(), torch.zeros(1, *shape)).graph_module
    rebuilt = graph_from_json(graph_json(traced), where="test", input_shape=shape, input_dtype=torch.float32)
    rebuilt.load_state_dict(traced.state_dict())
    return traced, rebuilt.eval()


@pytest.mark.parametrize(("factory", "shape"), [
    (lambda: build_model(f"{USER_MODELS}:build", 10), DIGIT),  # fx: branches, residuals, methods
    (lambda: build_model(f"{USER_MODELS}:ShapeBranchNet"), (4, 8, 8)),  # torch.export: ATen operators
    (lambda: torchvision.models.resnet18(num_classes=5), (3, 64, 64)),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), (3, 64, 64)),
], ids=["skipnet-fx", "shape-branch-export", "resnet18", "mobilenet_v3_small"])
def test_a_shipped_graph_computes_what_the_model_does(factory: Callable[[], nn.Module], shape: tuple[int, ...]
                                                      ) -> None:
    traced, rebuilt = shipped(factory(), shape)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), traced(x))
    assert [n.name for n in rebuilt.graph.nodes] == [n.name for n in traced.graph.nodes], "cut ids keep meaning"


def test_rebuilt_tensors_are_zero_until_weights_load() -> None:
    traced = trace_model(build_model(f"{USER_MODELS}:build", 10).eval(), torch.zeros(1, *DIGIT)).graph_module
    rebuilt = graph_from_json(graph_json(traced), where="test", input_shape=DIGIT, input_dtype=torch.float32)
    assert rebuilt.state_dict().keys() == traced.state_dict().keys()
    assert all(not t.any() for t in rebuilt.state_dict().values())


def test_a_graph_that_calls_the_models_own_code_cannot_be_written() -> None:
    traced = trace_model(build_model(f"{USER_MODELS}:own_op", 10).eval(), torch.zeros(1, *DIGIT)).graph_module
    with pytest.raises(GraphNotShippable, match="halve"):
        graph_json(traced)


def test_a_hooked_layer_cannot_be_written() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    traced = trace_model(model.eval(), torch.zeros(1, *DIGIT)).graph_module
    traced.get_submodule("0").register_forward_hook(lambda *_: None)
    with pytest.raises(GraphNotShippable, match="hooks"):
        graph_json(traced)


# ---------------------------------------------------------------------------------------------- attacks
def small_graph() -> dict:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    traced = torch.fx.symbolic_trace(model.eval())
    return json.loads(graph_json(traced))


def node_calling(op: str, target: str, args: list) -> dict:
    return {"op": op, "name": "evil", "target": target, "args": {"tuple": args}, "kwargs": {}, "scopes": []}


def with_node(graph: dict, node: dict) -> dict:
    """``graph`` with ``node`` run right after the input."""
    graph["nodes"].insert(1, node)
    return graph


def refusal(graph: dict | str) -> str:
    text = graph if isinstance(graph, str) else json.dumps(graph)
    with pytest.raises(PackageError) as refused:
        graph_from_json(text, where="stage file abc", input_shape=DIGIT, input_dtype=torch.float32)
    message = str(refused.value)
    assert message.startswith("stage file abc carries a graph"), message
    return message


@pytest.mark.parametrize("target", ["builtins.exec", "builtins.eval", "builtins.open", "os.system", "posix.system",
                                    "subprocess.run", "torch.save", "torch.load", "torch.hub.load",
                                    "torch.from_file", "torch.set_default_device", "importlib.import_module"])
def test_a_function_outside_the_allowlist_is_refused(target: str) -> None:
    graph = with_node(small_graph(), node_calling("call_function", target, [{"node": "input_1"}]))
    assert "not an allowed tensor operation" in refusal(graph)


@pytest.mark.parametrize("target", ["aten.from_file.default", "aten._print.default", "aten.set_.source_Tensor",
                                    "aten.no_such_op.default", "aten.add", "aten.add.Tensor.extra"])
def test_a_denied_or_unknown_aten_operator_is_refused(target: str) -> None:
    graph = with_node(small_graph(), node_calling("call_function", target, [{"node": "input_1"}]))
    assert "ATen operator" in refusal(graph)


@pytest.mark.parametrize("method", ["register_hook", "apply_", "map_", "storage", "tolist", "numpy", "set_",
                                    "__reduce_ex__", "_backward_hooks"])
def test_a_denied_tensor_method_is_refused(method: str) -> None:
    graph = with_node(small_graph(), node_calling("call_method", method, [{"node": "input_1"}]))
    assert "not an allowed tensor method" in refusal(graph)


def test_a_method_on_a_constant_is_refused() -> None:
    graph = with_node(small_graph(), node_calling("call_method", "add", ["text", 1]))
    assert "did not compute" in refusal(graph)


@pytest.mark.parametrize("attribute", ["__class__", "__dict__", "_backward_hooks", "grad_fn", "data"])
def test_reading_an_attribute_other_than_a_tensor_property_is_refused(attribute: str) -> None:
    graph = with_node(small_graph(), node_calling("call_function", "builtins.getattr",
                                                  [{"node": "input_1"}, attribute]))
    assert "reads an attribute" in refusal(graph)


@pytest.mark.parametrize("kind", ["Parameter", "SkipNet", "os", "Module.__subclasses__", "modules"])
def test_a_layer_that_is_not_a_torch_nn_layer_is_refused(kind: str) -> None:
    graph = small_graph()
    graph["modules"]["0"]["type"] = kind
    assert "not a torch.nn layer" in refusal(graph)


@pytest.mark.parametrize("setting", ["__class__", "_parameters", "_forward_hooks", "training"])
def test_a_layer_setting_that_would_replace_its_machinery_is_refused(setting: str) -> None:
    graph = small_graph()
    graph["modules"]["0"]["settings"][setting] = 1
    assert "setting" in refusal(graph)


def test_a_setting_that_breaks_the_layer_is_a_refusal_not_a_crash() -> None:
    graph = small_graph()
    graph["modules"]["0"]["settings"]["forward"] = "not a method"
    assert "cannot be rebuilt" in refusal(graph)


def test_tensors_too_large_are_refused_before_they_are_allocated() -> None:
    graph = small_graph()
    graph["modules"]["3"]["parameters"]["weight"]["shape"] = [1 << 31, 1 << 20]
    assert "GiB" in refusal(graph)


def test_a_value_too_large_is_refused_on_the_meta_device() -> None:
    graph = small_graph()
    graph["modules"]["1"] = {"type": "Upsample", "settings": {"name": "Upsample", "size": None,
                                                              "scale_factor": 30000.0, "mode": "nearest",
                                                              "align_corners": None, "recompute_scale_factor": None},
                             "parameters": {}, "buffers": {}, "children": {}}
    assert "MiB per sample" in refusal(graph)


def test_deep_nesting_is_refused() -> None:
    value: object = 1
    for _ in range(40):
        value = {"tuple": [value]}
    graph = with_node(small_graph(), node_calling("call_function", "torch.relu", [{"node": "input_1"}, value]))
    assert "cannot read" in refusal(graph)


@pytest.mark.parametrize("case", ["use before definition", "duplicate name", "bad name", "bad format", "not json",
                                  "unknown op", "undeclared layer"])
def test_a_malformed_graph_is_refused(case: str) -> None:
    graph = small_graph()
    nodes = graph["nodes"]
    if case == "use before definition":
        nodes[1]["args"] = {"tuple": [{"node": nodes[2]["name"]}]}
    elif case == "duplicate name":
        nodes[2]["name"] = nodes[1]["name"]
    elif case == "bad name":
        nodes[1]["name"] = "x; import os"
    elif case == "bad format":
        graph["format"] = "splitexit.graph/0"
    elif case == "unknown op":
        nodes[1]["op"] = "call_python"
    elif case == "undeclared layer":
        nodes[1]["target"] = "nowhere"
    refusal("{not json" if case == "not json" else graph)


def test_reading_a_graph_imports_nothing_and_unpickles_nothing(tmp_path: Path) -> None:
    """In a fresh process where the user's module does not exist, audit every import, unpickling and
    process start while the graph is read and run."""
    traced = trace_model(build_model(f"{USER_MODELS}:build", 10).eval(), torch.zeros(1, *DIGIT)).graph_module
    (tmp_path / "graph.json").write_text(graph_json(traced))
    script = textwrap.dedent("""
        import sys, torch
        from splitexit.model.graph_file import graph_from_json
        text = open("graph.json").read()
        seen = []
        def audit(event, args):
            if event in ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn") or \\
                    (event == "import" and not str(args[0]).startswith(("torch", "sympy", "mpmath"))):
                seen.append(f"{event} {args[0]}")
        sys.addaudithook(audit)
        graph = graph_from_json(text, where="test", input_shape=(1, 8, 8), input_dtype=torch.float32)
        graph(torch.zeros(2, 1, 8, 8))
        print("events:", seen)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "events: []", result.stdout
