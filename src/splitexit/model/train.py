"""Train exit heads, or the whole net jointly, with the right train/eval modes.

``heads`` mode freezes the backbone completely: its parameters get no gradient and its modules stay in
eval mode, so BatchNorm statistics and dropout do not move. ``joint`` mode trains everything from
whatever weights the backbone has (random ones: training from scratch) with a weighted sum of every
exit's cross-entropy on logits, plus optional distillation from the final exit to the early ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from splitexit.config import TrainConfig
from splitexit.errors import ConfigError
from splitexit.model.exits import EarlyExitNet

__all__ = ["TrainReport", "train"]

logger = logging.getLogger(__name__)

#: Called after each epoch with (epoch, epochs, mean loss).
EpochCallback = Callable[[int, int, float], None]


@dataclass
class TrainReport:
    mode: str
    epochs: int
    losses: list[float] = field(default_factory=list)


def train(net: EarlyExitNet, dataset: Dataset, config: TrainConfig = TrainConfig(), *,
          on_epoch: EpochCallback | None = None) -> TrainReport:
    """Train ``net`` in place on ``dataset`` of (input, label) pairs; returns the loss per epoch."""
    weights = _exit_weights(net, config)
    torch.manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(config.seed))
    parameters = _trainable(net, config.mode)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                   steps_per_epoch=max(1, len(loader)))
    report = TrainReport(mode=config.mode, epochs=config.epochs)
    try:
        for epoch in range(config.epochs):
            _set_modes(net, config.mode)
            total, count = 0.0, 0
            for inputs, labels in loader:
                loss = _loss(net(inputs), labels, weights, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(labels)
                count += len(labels)
            report.losses.append(total / max(count, 1))
            if on_epoch:
                on_epoch(epoch + 1, config.epochs, report.losses[-1])
    finally:
        for parameter in net.parameters():
            parameter.requires_grad_(True)
        net.eval()
    return report


def _exit_weights(net: EarlyExitNet, config: TrainConfig) -> list[float]:
    weights = list(config.exit_weights) if config.exit_weights else [1.0] * net.num_exits
    if len(weights) != net.num_exits:
        raise ConfigError(f"--exit-weights needs {net.num_exits} values (one per exit, final included), "
                          f"got {len(weights)}")
    if config.mode == "heads":
        weights[-1] = 0.0  # the final exit is the frozen backbone: nothing to learn there
    return weights


def _trainable(net: EarlyExitNet, mode: str) -> list[torch.nn.Parameter]:
    for parameter in net.segments.parameters():
        parameter.requires_grad_(mode == "joint")
    parameters = [p for p in net.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("nothing to train: the net has no trainable parameters in this mode")
    return parameters


def _set_modes(net: EarlyExitNet, mode: str) -> None:
    """Joint: everything in train mode. Heads: only heads; the backbone keeps its BatchNorm statistics."""
    net.train()
    if mode == "heads":
        net.segments.eval()


def _loss(outputs: list[torch.Tensor], labels: torch.Tensor, weights: list[float],
          config: TrainConfig) -> torch.Tensor:
    loss = sum(w * F.cross_entropy(logits, labels) for w, logits in zip(weights, outputs) if w > 0)
    if config.distill > 0:
        t = config.distill_temperature
        teacher = F.softmax(outputs[-1].detach() / t, dim=1)
        for logits in outputs[:-1]:
            student = F.log_softmax(logits / t, dim=1)
            loss = loss + config.distill * (t * t) * F.kl_div(student, teacher, reduction="batchmean")
    return loss  # type: ignore[return-value]  # sum() of tensors; int 0 only if every exit weight is 0
