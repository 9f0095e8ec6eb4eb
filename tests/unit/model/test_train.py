"""Training modes: heads-only leaves the backbone (and BatchNorm statistics) alone; joint moves it. Per-epoch
validation accuracy per exit, and early stopping that keeps the best epoch's weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from splitexit import EarlyExitNet, TrainConfig, build_model, train
from splitexit.errors import ConfigError
from splitexit.model.train import EpochResult


def _net() -> EarlyExitNet:
    torch.manual_seed(0)
    return EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8))


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(96, 1, 8, 8, generator=generator),
                         torch.randint(0, 10, (96,), generator=generator))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_heads_mode_freezes_backbone_weights_and_batchnorm_statistics() -> None:
    net = _net()
    backbone, heads = _snapshot(net.segments), _snapshot(net.heads)
    train(net, _data(), TrainConfig(mode="heads", epochs=2, batch_size=32))
    after = _snapshot(net.segments)
    assert all(torch.equal(backbone[k], after[k]) for k in backbone), "backbone (incl. BN running stats) moved"
    assert any(not torch.equal(heads[k], v) for k, v in _snapshot(net.heads).items())
    assert all(p.requires_grad for p in net.parameters()), "requires_grad must be restored after training"
    assert not net.training


def test_joint_mode_trains_backbone_and_heads() -> None:
    net = _net()
    backbone = _snapshot(net.segments)
    report = train(net, _data(), TrainConfig(mode="joint", epochs=2, batch_size=32))
    assert len(report.losses) == 2
    changed = [k for k, v in _snapshot(net.segments).items() if not torch.equal(backbone[k], v)]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight") for k in changed)


def test_training_is_seeded() -> None:
    config = TrainConfig(mode="joint", epochs=2, batch_size=16, seed=3, distill=0.5)
    first = train(_net(), _data(), config).losses
    second = train(_net(), _data(), config).losses
    assert first == second


def test_joint_training_learns_a_separable_problem() -> None:
    torch.manual_seed(0)
    labels = torch.arange(200) % 10
    inputs = labels.float().view(-1, 1, 1, 1) / 9 + 0.02 * torch.randn(200, 1, 8, 8)  # class = brightness
    net = _net()
    train(net, TensorDataset(inputs, labels), TrainConfig(epochs=15, batch_size=32, lr=5e-3))
    with torch.no_grad():
        outputs = net.eval()(inputs)
    accuracies = [float((o.argmax(1) == labels).float().mean()) for o in outputs]
    assert all(a > 0.8 for a in accuracies), accuracies  # chance is 0.1


def _accuracies(net: EarlyExitNet, data: TensorDataset) -> tuple[float, ...]:
    inputs, labels = data.tensors
    with torch.no_grad():
        return tuple(float((o.argmax(1) == labels).float().mean()) for o in net.eval()(inputs))


def test_every_epoch_reports_each_exits_validation_accuracy() -> None:
    net, validation, seen = _net(), _data(), []
    report = train(net, _data(), TrainConfig(epochs=3, batch_size=32), validation=validation, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [1, 2, 3] and all(isinstance(r, EpochResult) for r in seen)
    assert [r.accuracy for r in seen] == report.accuracy and len(report.accuracy[0]) == net.num_exits
    assert report.kept_epoch == 3 and not report.stopped_early
    assert report.accuracy[-1] == _accuracies(net, validation), "the last epoch's figures are the net's"


def test_patience_stops_early_and_keeps_the_best_epochs_weights() -> None:
    generator = torch.Generator().manual_seed(5)  # labels that have nothing to do with the inputs: no progress
    noise = TensorDataset(torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,),
                                                                                         generator=generator))
    net = _net()
    report = train(net, _data(), TrainConfig(epochs=40, batch_size=32, patience=2), validation=noise)
    assert report.stopped_early and len(report.losses) == len(report.accuracy) < 40
    means = [sum(a) / len(a) for a in report.accuracy]
    assert report.kept_epoch == 1 + means.index(max(means)) == len(report.losses) - 2
    assert _accuracies(net, noise) == report.accuracy[report.kept_epoch - 1], "the best epoch's weights are back"


def test_patience_needs_a_validation_set() -> None:
    with pytest.raises(ConfigError, match="needs a validation set"):
        train(_net(), _data(), TrainConfig(epochs=2, patience=1))
