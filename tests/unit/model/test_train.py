"""Training modes: heads-only leaves the backbone (and BatchNorm statistics) alone; joint moves it."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from splitexit import EarlyExitNet, TrainConfig, build_model, train


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
