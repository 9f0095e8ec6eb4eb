"""EarlyExitNet (model/exits.py): construction, per-sample routing, modes, costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from splitexit.config import ExitPolicy
from splitexit.errors import ConfigError, CutError
from splitexit.model import zoo
from splitexit.model.exits import EarlyExitNet
from splitexit.model.heads import confidence_function, list_confidences

#: A threshold must sit at least this far from every score, so float noise between batch sizes cannot
#: move a sample across it.
MIN_GAP = 1e-4


class ResidualNet(nn.Module):
    """Inside ``body`` the skip input crosses too, so no exit can sit at its end."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.fc(x.mean(dim=(2, 3)))


def ShapeBranchNet() -> nn.Module:  # noqa: N802 - reads like the class it builds
    """Shape-based control flow (fx fails, torch.export works), from the shared test models file."""
    return zoo.build_model(f"{Path(__file__).resolve().parents[2] / 'assets' / 'models.py'}:ShapeBranchNet")


@pytest.fixture
def digits_model() -> nn.Module:
    torch.manual_seed(0)
    return zoo.build_model("digits_cnn").eval()


@pytest.fixture
def digits_input() -> torch.Tensor:
    return torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def digits_net(digits_model, digits_input) -> EarlyExitNet:
    torch.manual_seed(0)
    return EarlyExitNet.from_model(digits_model, digits_input[:1], exits="auto").eval()


def _spread_policy(net: EarlyExitNet, x: torch.Tensor, confidence: str) -> ExitPolicy:
    """Thresholds near the median confidence of the samples still running at each exit.

    About half the remaining samples leave at every early exit. Each threshold is the midpoint of the
    widest gap between neighbouring scores in the middle half, so no sample sits on a threshold.
    """
    early = net.num_exits - 1
    temperatures = tuple(0.05 + 0.02 * i for i in range(early)) + (0.5,)  # sharpen random-weight logits
    score = confidence_function(confidence)
    with torch.no_grad():
        outputs = net(x)
    remaining = torch.arange(x.shape[0])
    thresholds = []
    for i in range(early):
        scores = score(outputs[i][remaining] / temperatures[i])
        ordered = scores.sort().values
        lo, hi = len(ordered) // 4, max(len(ordered) * 3 // 4, len(ordered) // 4 + 2)
        gaps = ordered[lo + 1: hi] - ordered[lo: hi - 1]
        k = lo + int(gaps.argmax())
        assert float(gaps.max()) > MIN_GAP, f"test setup: scores at exit {i} are too close to split"
        threshold = float(ordered[k] + ordered[k + 1]) / 2
        thresholds.append(threshold)
        remaining = remaining[scores < threshold]
    return ExitPolicy(confidence=confidence, temperatures=temperatures, thresholds=tuple(thresholds))


# ------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("confidence", list_confidences())
def test_batched_infer_equals_infer_one_sample_at_a_time(digits_net, digits_input, confidence):
    policy = _spread_policy(digits_net, digits_input, confidence)
    digits_net.set_policy(policy)
    batch = digits_net.infer(digits_input)
    assert len(batch) == digits_input.shape[0]
    assert set(batch.exit.tolist()) == set(range(digits_net.num_exits)), batch.exit  # every exit answers some
    for i in range(digits_input.shape[0]):
        one = digits_net.infer(digits_input[i: i + 1])
        assert int(one.prediction[0]) == int(batch.prediction[i]), i
        assert int(one.exit[0]) == int(batch.exit[i]), i
        torch.testing.assert_close(one.confidence[0], batch.confidence[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one.logits[0], batch.logits[i], rtol=1e-5, atol=1e-5)

    # each answer is the forward pass's logits at the exit that answered, scored at that exit's temperature
    score = confidence_function(confidence)
    with torch.no_grad():
        outputs = digits_net(digits_input)
    for i, exit_index in enumerate(batch.exit.tolist()):
        logits = outputs[exit_index][i: i + 1]
        torch.testing.assert_close(batch.logits[i], logits[0], rtol=1e-5, atol=1e-5)
        assert int(batch.prediction[i]) == int(logits.argmax(dim=1))
        expected_score = score(logits / policy.temperatures[exit_index])[0]
        torch.testing.assert_close(batch.confidence[i], expected_score, rtol=1e-5, atol=1e-5)
        if exit_index < digits_net.num_exits - 1:
            assert float(batch.confidence[i]) >= policy.thresholds[exit_index]


def test_uncalibrated_net_answers_every_sample_at_the_final_exit(digits_model, digits_net, digits_input):
    assert all(t == float("inf") for t in digits_net.policy.thresholds)
    result = digits_net.infer(digits_input)
    with torch.no_grad():
        expected = digits_model(digits_input)
    assert (result.exit == digits_net.num_exits - 1).all()
    assert torch.equal(result.prediction, expected.argmax(dim=1))
    torch.testing.assert_close(result.logits, expected)
    assert result.prediction.dtype == torch.int64 and result.exit.dtype == torch.int64


def test_infer_restores_training_mode_and_tracks_no_gradients(digits_net, digits_input):
    expected = digits_net.infer(digits_input)  # eval mode
    assert not digits_net.training
    digits_net.train()
    norms = [m for m in digits_net.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in norms]
    result = digits_net.infer(digits_input)
    assert digits_net.training and all(m.training for m in digits_net.modules())
    for norm, before in zip(norms, stats, strict=True):
        assert torch.equal(norm.running_mean, before)  # infer ran in eval mode: no statistics updated
    for tensor in (result.prediction, result.exit, result.confidence, result.logits):
        assert not tensor.requires_grad
    assert all(p.grad is None for p in digits_net.parameters())
    assert torch.equal(result.prediction, expected.prediction)
    torch.testing.assert_close(result.logits, expected.logits)


def test_user_confidence_callable_is_used_with_tempered_logits(digits_net, digits_input):
    temperatures = (0.5, 0.25, 2.0, 1.0)[: digits_net.num_exits - 1] + (1.0,)
    digits_net.set_policy(ExitPolicy(temperatures=temperatures, thresholds=(0.5,) * (digits_net.num_exits - 1)))
    seen: list[torch.Tensor] = []

    def always_sure(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return torch.ones(logits.shape[0])

    result = digits_net.infer(digits_input, confidence=always_sure)
    assert (result.exit == 0).all()
    assert (result.confidence == 1).all()
    assert len(seen) == 1
    with torch.no_grad():
        first_exit = digits_net(digits_input)[0]
    torch.testing.assert_close(seen[0], first_exit / temperatures[0])

    never_sure = digits_net.infer(digits_input, confidence=lambda logits: torch.zeros(logits.shape[0]))
    assert (never_sure.exit == digits_net.num_exits - 1).all()
    # the override lasts one call: the policy's own confidence function (max_softmax) is back
    assert digits_net.policy.confidence == "max_softmax"
    own = digits_net.infer(digits_input)
    leaves_first = torch.softmax(first_exit / temperatures[0], dim=1).amax(dim=1) >= 0.5
    assert torch.equal(own.exit == 0, leaves_first)
    assert not leaves_first.all()


@pytest.mark.parametrize("bad", [
    lambda logits: logits,  # (B, C)
    lambda logits: torch.ones(1),  # one score for the whole batch
    lambda logits: torch.ones(logits.shape[0], dtype=torch.int64),  # not a float
    lambda logits: torch.ones(logits.shape[0] + 1),
], ids=["rows-by-classes", "scalar-like", "integer", "too-long"])
def test_user_confidence_with_the_wrong_shape_raises_config_error(digits_net, digits_input, bad):
    digits_net.train()
    with pytest.raises(ConfigError, match="one float score per row"):
        digits_net.infer(digits_input[:4], confidence=bad)
    assert digits_net.training  # restored on the error path too


def test_set_policy_checks_exit_count_and_confidence_name(digits_net):
    early = digits_net.num_exits - 1
    with pytest.raises(ConfigError):
        digits_net.set_policy(ExitPolicy(temperatures=(1.0,) * early, thresholds=(0.5,) * (early - 1)))
    with pytest.raises(ConfigError):
        digits_net.set_policy(ExitPolicy(confidence="no_such_confidence", temperatures=(1.0,) * (early + 1),
                                         thresholds=(0.5,) * early))
    assert digits_net.policy.confidence == "max_softmax"


# ------------------------------------------------------------------------------------ placing exits
def test_exits_named_by_module_sit_at_the_end_of_those_modules(digits_model, digits_input):
    net = EarlyExitNet.from_model(digits_model, digits_input, exits=["block2", "block3"]).eval()
    assert net.num_exits == 3
    assert "block2" in net.exit_cuts[0].ends_modules
    assert "block3" in net.exit_cuts[1].ends_modules
    with torch.no_grad():
        after_block2 = digits_model.block2(digits_model.block1(digits_input))
        after_block3 = digits_model.block3(after_block2)
        (first,) = net.segments[0](digits_input)
        (second,) = net.segments[1](first)
        torch.testing.assert_close(first, after_block2)
        torch.testing.assert_close(second, after_block3)
        outputs = net(digits_input)
        torch.testing.assert_close(outputs[-1], digits_model(digits_input))
    assert [o.shape for o in outputs] == [(digits_input.shape[0], 10)] * 3

    by_id = EarlyExitNet.from_model(digits_model, digits_input, exits=[net.exit_cuts[0].id, "block3"])
    assert [c.id for c in by_id.exit_cuts] == [c.id for c in net.exit_cuts]


@pytest.mark.parametrize("exits", [["block3", "block2"], ["block2", "block2"]])
def test_exits_out_of_order_or_repeated_raise_cut_error(digits_model, digits_input, exits):
    with pytest.raises(CutError, match="forward order"):
        EarlyExitNet.from_model(digits_model, digits_input, exits=exits)


def test_exit_where_two_tensors_cross_raises_cut_error():
    model = ResidualNet().eval()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(CutError, match="2 tensors"):
        EarlyExitNet.from_model(model, x, exits=["body"])
    net = EarlyExitNet.from_model(model, x, exits=["stem"])  # before the skip region it is fine
    assert net.num_exits == 2
    two_tensor_cut = next(c for c in net.graph.cut_points if len(c.tensors) == 2)
    with pytest.raises(CutError, match="2 tensors"):
        EarlyExitNet.from_model(model, x, exits=[two_tensor_cut.id])


def test_exits_as_a_plain_string_other_than_auto_raise_config_error(digits_model, digits_input):
    with pytest.raises(ConfigError, match="auto"):
        EarlyExitNet.from_model(digits_model, digits_input, exits="block2")


# ------------------------------------------------------------------------------------ costs
def test_exit_costs_increase_and_the_last_covers_the_whole_model(digits_net):
    costs = digits_net.exit_costs()
    assert len(costs) == digits_net.num_exits
    assert all(a < b for a, b in zip(costs, costs[1:])), costs
    assert costs[-1] >= digits_net.total_flops
    assert costs[-1] == digits_net.total_flops + sum(digits_net.head_flops)
    assert costs[0] == digits_net.exit_cuts[0].flops_before + digits_net.head_flops[0]
    assert all(h > 0 for h in digits_net.head_flops)


def test_every_auto_exit_is_cheaper_than_the_whole_model(digits_net):
    early_costs = digits_net.exit_costs()[:-1]
    assert all(cost < digits_net.total_flops for cost in early_costs), (early_costs, digits_net.total_flops)


# ------------------------------------------------------------------------------------ export-traced models
def test_infer_on_an_export_traced_model():
    torch.manual_seed(0)
    model = ShapeBranchNet().eval()
    x = torch.randn(3, 4, 8, 8)
    net = EarlyExitNet.from_model(model, x, exits=[1]).eval()
    assert net.graph.tracer == "export"
    result = net.infer(x)
    with torch.no_grad():
        assert torch.equal(result.prediction, model(x).argmax(dim=1))
