"""Tracing, cut discovery and segment extraction (model/graph.py).

The central property (STYLE rule 10): for every cut, the segments on either side chained together give
exactly the unsplit model's output.
"""

from __future__ import annotations

import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import CutError, TraceError
from splitexit.model import zoo
from splitexit.model.exits import EarlyExitNet
from splitexit.model.graph import list_cut_points, run_chain, trace_model


class SkipCatNet(nn.Module):
    """A user-style CNN with a residual addition and a channel concatenation."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.residual = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.branch = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.residual(x))
        x = torch.cat([x, self.branch(x)], dim=1)
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class ConvStack(nn.Module):
    """Eight identical conv blocks: compute is spread evenly, so auto exits should be too."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(8)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


class ValueBranchNet(nn.Module):
    """Python control flow on a tensor's value: neither fx nor export can follow it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.fc(x)


def ShapeBranchNet() -> nn.Module:  # noqa: N802 - reads like the class it builds
    """Shape-based control flow (fx fails, torch.export works), from the shared test models file."""
    return zoo.build_model(f"{Path(__file__).resolve().parents[2] / 'assets' / 'models.py'}:ShapeBranchNet")


BATCH = 3


@pytest.fixture
def skip_model() -> SkipCatNet:
    torch.manual_seed(0)
    return SkipCatNet().eval()


@pytest.fixture
def skip_input() -> torch.Tensor:
    return torch.randn(BATCH, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def skip_graph(skip_model, skip_input):
    return trace_model(skip_model, skip_input)


def _modules_of(cut) -> set[str]:
    """Top-level module names the node before the cut belongs to."""
    return {m.split(".")[0] for m in cut.ends_modules}


# ------------------------------------------------------------------------------------ discovery
def test_cuts_inside_skip_regions_carry_two_tensors(skip_model, skip_input):
    cuts = list_cut_points(skip_model, skip_input)
    assert [c.id for c in cuts] == sorted({c.id for c in cuts})
    inside_residual = [c for c in cuts if "residual" in _modules_of(c)]
    inside_branch = [c for c in cuts if "branch" in _modules_of(c)]
    assert len(inside_residual) == 3 and len(inside_branch) == 2
    stem_out = next(c for c in cuts if "stem" in c.ends_modules).tensors[0].name
    for cut in inside_residual:
        # the skip input waits across the whole residual body
        assert len(cut.tensors) == 2, cut.describe()
        assert cut.tensors[0].name == stem_out
        assert not cut.can_carry_exit
    for cut in inside_branch:
        # the pre-branch tensor waits for the concatenation
        assert len(cut.tensors) == 2, cut.describe()
        assert not cut.can_carry_exit
    after_add = next(c for c in cuts if c.after == "add")
    after_cat = next(c for c in cuts if c.after == "cat")
    assert len(after_add.tensors) == 1 and len(after_cat.tensors) == 1
    assert after_cat.tensors[0].shape == (12, 12, 12)
    assert sum(len(c.tensors) >= 2 for c in cuts) == 5


def test_every_cut_splits_into_two_segments_that_reproduce_the_model(skip_model, skip_input, skip_graph):
    with torch.no_grad():
        expected = skip_model(skip_input)
        assert skip_graph.cut_points
        for cut in skip_graph.cut_points:
            head = skip_graph.segment(MODEL_INPUT, cut.id)
            tail = skip_graph.segment(cut.id, MODEL_OUTPUT)
            crossing = head(skip_input)
            assert isinstance(crossing, tuple) and len(crossing) == len(cut.tensors)
            torch.testing.assert_close(tail(*crossing), expected, msg=lambda m, c=cut: f"{c.describe()}: {m}")
            torch.testing.assert_close(run_chain([head, tail], skip_input), expected)


def test_three_segments_at_any_two_cuts_reproduce_the_model(skip_model, skip_input, skip_graph):
    # every pair, not a random sample: it is cheap, and pairs straddling the skip regions are the ones that matter
    pairs = list(itertools.combinations([c.id for c in skip_graph.cut_points], 2))
    assert len(pairs) > 50
    with torch.no_grad():
        expected = skip_model(skip_input)
        for first, second in pairs:
            segments = [skip_graph.segment(MODEL_INPUT, first), skip_graph.segment(first, second),
                        skip_graph.segment(second, MODEL_OUTPUT)]
            torch.testing.assert_close(run_chain(segments, skip_input), expected,
                                       msg=lambda m, a=first, b=second: f"cuts {a}, {b}: {m}")


def test_segment_chain_follows_a_different_batch_size(skip_model, skip_graph):
    cut = next(c for c in skip_graph.cut_points if len(c.tensors) == 2)
    x = torch.randn(7, 3, 12, 12)
    with torch.no_grad():
        out = run_chain([skip_graph.segment(MODEL_INPUT, cut.id), skip_graph.segment(cut.id, MODEL_OUTPUT)], x)
        torch.testing.assert_close(out, skip_model(x))


def test_empty_or_backward_segment_is_refused(skip_graph):
    a, b = skip_graph.cut_points[2].id, skip_graph.cut_points[5].id
    with pytest.raises(CutError):
        skip_graph.segment(b, a)
    with pytest.raises(CutError):
        skip_graph.segment(a, a)


# ------------------------------------------------------------------------------------ shapes and bytes
def test_crossing_tensors_are_described_per_sample(skip_input, skip_graph):
    with torch.no_grad():
        for cut in skip_graph.cut_points:
            crossing = skip_graph.segment(MODEL_INPUT, cut.id)(skip_input)
            for info, value in zip(cut.tensors, crossing, strict=True):
                assert info.shape == tuple(value.shape[1:]), cut.describe()  # batch dimension left out
                assert value.shape[0] == BATCH
                assert info.dtype == torch.float32
                assert info.bytes_per_sample == math.prod(info.shape) * 4
            assert cut.bytes_per_sample == sum(math.prod(t.shape) * 4 for t in cut.tensors)


def test_bytes_follow_the_dtype():
    model = ConvStack().double().eval()
    graph = trace_model(model, torch.randn(1, 8, 6, 6, dtype=torch.float64))
    cut = graph.resolve("blocks.3")
    assert cut.tensors[0].dtype == torch.float64
    assert cut.tensors[0].shape == (8, 6, 6)
    assert cut.bytes_per_sample == 8 * 6 * 6 * 8


# ------------------------------------------------------------------------------------ resolving cuts
def test_resolve_by_module_node_name_and_id(skip_graph):
    stem = skip_graph.resolve("stem")
    assert "stem" in stem.ends_modules
    assert stem.after == "stem_1"  # the module's last node, not its first
    residual_conv = skip_graph.resolve("residual.2")
    assert "residual.2" in residual_conv.ends_modules and len(residual_conv.tensors) == 2
    add = skip_graph.resolve("add")
    assert add.after == "add"
    assert skip_graph.resolve(add.id) == add
    assert skip_graph.resolve(str(add.id)) == add
    assert skip_graph.cut(add.id) == add


@pytest.mark.parametrize("location", ["nonexistent", "stem.7", -1, 10**6])
def test_resolve_unknown_location_raises_cut_error_pointing_at_cuts(skip_graph, location):
    with pytest.raises(CutError, match="splitexit cuts"):
        skip_graph.resolve(location)


def test_cut_out_of_range_raises_cut_error(skip_graph):
    with pytest.raises(CutError, match="splitexit cuts"):
        skip_graph.cut(10**6)


# ------------------------------------------------------------------------------------ auto exits
def test_auto_exits_are_ordered_single_tensor_cuts(skip_graph):
    exits = skip_graph.auto_exits(3)
    assert len(exits) == 3
    ids = [c.id for c in exits]
    assert ids == sorted(set(ids))
    assert all(len(c.tensors) == 1 and c.can_carry_exit for c in exits)
    fractions = [c.flops_before / skip_graph.total_flops for c in exits]
    assert all(0 < f < 1 for f in fractions)
    assert fractions == sorted(set(fractions))


def test_auto_exits_spread_by_flops_when_compute_is_even():
    graph = trace_model(ConvStack().eval(), torch.randn(1, 8, 6, 6))
    exits = graph.auto_exits(3)
    fractions = [c.flops_before / graph.total_flops for c in exits]
    assert len(exits) == 3 and all(len(c.tensors) == 1 for c in exits)
    assert fractions == sorted(set(fractions))
    for k, fraction in enumerate(fractions, start=1):
        assert abs(fraction - k / 4) <= 0.13, fractions


# ------------------------------------------------------------------------------------ tracing
def test_value_dependent_branch_raises_trace_error_naming_the_line():
    lines, first = inspect.getsourcelines(ValueBranchNet.forward)
    line = first + next(i for i, text in enumerate(lines) if "if x.sum() > 0" in text)
    with pytest.raises(TraceError) as info:
        trace_model(ValueBranchNet(), torch.randn(1, 4))
    message = str(info.value)
    assert f"{inspect.getsourcefile(ValueBranchNet)}:{line}" in message
    assert "torch.where" in message


def test_model_fx_cannot_trace_falls_back_to_export():
    torch.manual_seed(0)
    model = ShapeBranchNet().eval()
    graph = trace_model(model, torch.randn(1, 4, 8, 8))
    assert graph.tracer == "export"
    assert graph.cut_points and all(len(c.tensors) == 1 for c in graph.cut_points)
    for batch in (1, 5):  # the batch dimension stays dynamic
        x = torch.randn(batch, 4, 8, 8)
        with torch.no_grad():
            for cut in graph.cut_points:
                (crossing,) = graph.segment(MODEL_INPUT, cut.id)(x)
                assert tuple(crossing.shape) == (batch, *cut.tensors[0].shape)


def test_export_traced_segments_chain_to_the_model_output():
    torch.manual_seed(0)
    model = ShapeBranchNet().eval()
    graph = trace_model(model, torch.randn(1, 4, 8, 8))
    assert graph.tracer == "export"
    for batch in (1, 5):
        x = torch.randn(batch, 4, 8, 8)
        with torch.no_grad():
            expected = model(x)
            for cut in graph.cut_points:
                out = run_chain([graph.segment(MODEL_INPUT, cut.id), graph.segment(cut.id, MODEL_OUTPUT)], x)
                torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------ built-in models
@pytest.mark.parametrize("name", zoo.list_models())
def test_builtin_model_with_auto_exits_keeps_the_model_output(name):
    torch.manual_seed(0)
    model = zoo.build_model(name).eval()
    x = torch.randn(4, *zoo.default_input_shape(name))
    net = EarlyExitNet.from_model(model, x, exits="auto").eval()
    assert net.num_exits >= 2
    with torch.no_grad():
        outputs = net(x)
        expected = model(x)
    assert len(outputs) == net.num_exits
    torch.testing.assert_close(outputs[-1], expected)
    for logits in outputs[:-1]:
        assert logits.shape == expected.shape
