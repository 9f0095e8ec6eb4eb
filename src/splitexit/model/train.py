"""Train exit heads, or the whole net jointly, with the right train/eval modes.

``heads`` mode freezes the backbone completely: its parameters get no gradient and its modules stay in
eval mode, so BatchNorm statistics and dropout do not move. ``joint`` mode trains everything from
whatever weights the backbone has (random ones: training from scratch) with a weighted sum of every
exit's cross-entropy on logits, plus optional distillation from the final exit to the early ones.

Training is reproducible: the same net, data, config and thread count give the same weights (seeded
batch order, torch's deterministic algorithms while it runs). With a validation set every epoch reports
each exit's accuracy on it, and ``patience`` stops once their mean has not improved for that many epochs,
keeping the best epoch's weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from splitexit.config import TrainConfig
from splitexit.errors import ConfigError
from splitexit.model.calibrate import collect_outputs
from splitexit.model.exits import EarlyExitNet

__all__ = ["EpochResult", "TrainReport", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochResult:
    """One epoch done: its mean training loss and, with a validation set, each exit's accuracy on it."""

    epoch: int
    epochs: int
    loss: float
    accuracy: tuple[float, ...] | None = None  # per exit, the final exit last


#: Called after each epoch.
EpochCallback = Callable[[EpochResult], None]


@dataclass
class TrainReport:
    mode: str
    epochs: int  # asked for; ``len(losses)`` were run
    losses: list[float] = field(default_factory=list)
    #: Per epoch, each exit's validation accuracy (empty without a validation set).
    accuracy: list[tuple[float, ...]] = field(default_factory=list)
    #: The epoch (from 1) whose weights the net has: the last, or with ``patience`` the best.
    kept_epoch: int = 0

    @property
    def stopped_early(self) -> bool:
        return len(self.losses) < self.epochs


def train(net: EarlyExitNet, dataset: Dataset, config: TrainConfig = TrainConfig(), *,
          validation: Dataset | None = None, on_epoch: EpochCallback | None = None) -> TrainReport:
    """Train ``net`` in place on ``dataset`` of (input, label) pairs; returns the loss (and, with
    ``validation``, each exit's accuracy) per epoch."""
    if config.patience is not None and validation is None:
        raise ConfigError("early stopping (patience) needs a validation set to watch")
    weights = _exit_weights(net, config)
    torch.manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(config.seed))
    parameters = _trainable(net, config.mode)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                   steps_per_epoch=max(1, len(loader)))
    report = TrainReport(mode=config.mode, epochs=config.epochs)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (mean accuracy, epoch, weights)
    try:
        with _deterministic():
            for epoch in range(1, config.epochs + 1):
                report.losses.append(_epoch(net, loader, optimizer, schedule, weights, config))
                report.kept_epoch = epoch
                accuracy = collect_outputs(net, validation).accuracy() if validation is not None else None
                if accuracy is not None:
                    report.accuracy.append(accuracy)
                if on_epoch:
                    on_epoch(EpochResult(epoch, config.epochs, report.losses[-1], accuracy))
                if config.patience is None or accuracy is None:
                    continue
                score = sum(accuracy) / len(accuracy)
                if best is None or score > best[0]:
                    best = (score, epoch, copy.deepcopy(net.state_dict()))
                elif epoch - best[1] >= config.patience:
                    logger.info("stopping after epoch %d: no better validation accuracy since epoch %d",
                                epoch, best[1])
                    break
        if best is not None and best[1] != report.kept_epoch:
            net.load_state_dict(best[2])
            report.kept_epoch = best[1]
    finally:
        for parameter in net.parameters():
            parameter.requires_grad_(True)
        net.eval()
    return report


def _epoch(net: EarlyExitNet, loader: DataLoader, optimizer: torch.optim.Optimizer,
           schedule: torch.optim.lr_scheduler.LRScheduler, weights: list[float], config: TrainConfig) -> float:
    """One pass over ``loader``; the mean loss per sample."""
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
    return total / max(count, 1)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """torch's deterministic algorithms while training, then whatever the caller had."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


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
