"""Exit heads and confidence functions, each in a registry so packages can name them.

Default heads follow the rank of the tensor at the exit: feature maps are globally average-pooled and
classified, token sequences are averaged over tokens, flat features go straight to a linear layer.
Confidence functions map logits (already divided by the exit's temperature) to one score per row in
[0, 1]; a sample leaves when its score reaches the exit's threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from splitexit.errors import ConfigError, CutError

__all__ = [
    "HeadBuilder",
    "build_head",
    "checked_scores",
    "confidence_function",
    "list_confidences",
    "list_heads",
    "register_confidence",
    "register_head",
]

#: Builds a head from the per-sample shape of the tensor at the exit and the number of classes.
HeadBuilder = Callable[[tuple[int, ...], int], nn.Module]
Confidence = Callable[[torch.Tensor], torch.Tensor]

#: Feature maps are pooled to GRID × GRID before the linear layer. 1 (global pooling) measured as accurate
#: as a 2 × 2 grid on digits at a quarter of the head's FLOPs; register a head with a larger grid if
#: your early features need spatial layout.
POOL_GRID = 1

_HEADS: dict[str, HeadBuilder] = {}
_CONFIDENCES: dict[str, Confidence] = {}


def register_head(name: str, builder: HeadBuilder) -> None:
    """Make a head builder available by name (to `from_model(head=...)` and to package loading)."""
    if name in _HEADS:
        raise ConfigError(f"a head named {name!r} is already registered")
    _HEADS[name] = builder


def list_heads() -> list[str]:
    return sorted(_HEADS)


def build_head(name: str, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if name not in _HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of {', '.join(list_heads())} "
                          f"or register yours with splitexit.register_head")
    return _HEADS[name](shape, num_classes)


def register_confidence(name: str, function: Confidence) -> None:
    """Make a confidence function available by name; it maps (B, C) logits to (B,) scores."""
    if name in _CONFIDENCES:
        raise ConfigError(f"a confidence function named {name!r} is already registered")
    _CONFIDENCES[name] = function


def list_confidences() -> list[str]:
    return sorted(_CONFIDENCES)


def confidence_function(name: str) -> Confidence:
    if name not in _CONFIDENCES:
        raise ConfigError(f"unknown confidence {name!r}; choose one of {', '.join(list_confidences())} "
                          f"or register yours with splitexit.register_confidence")
    return _CONFIDENCES[name]


def checked_scores(score: Confidence, logits: torch.Tensor) -> torch.Tensor:
    """Call a (possibly user-supplied) confidence function and make sure it returned one score per row."""
    scores = score(logits)
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    scores = scores.reshape(-1) if scores.numel() == logits.shape[0] else scores
    if scores.shape != (logits.shape[0],) or not scores.dtype.is_floating_point:
        raise ConfigError(f"confidence function must return one float score per row, shape ({logits.shape[0]},); "
                          f"it returned {scores.dtype} of shape {tuple(scores.shape)}")
    return scores


# ---------------------------------------------------------------------------------------------- heads
class PooledLinearHead(nn.Module):
    """Feature map (C, H, W) → adaptive average pool (to 1 × 1 by default) → linear."""

    def __init__(self, channels: int, num_classes: int, grid: int = POOL_GRID):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Linear(channels * grid * grid, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))


class TokenPoolHead(nn.Module):
    """Token sequence (T, D) → layer norm → mean over tokens → linear."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x).mean(dim=1))


class FlatLinearHead(nn.Module):
    """Any features → flatten → linear."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


def _pooled(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise CutError(f"head 'pool_linear' needs a (C, H, W) feature map, the exit carries {shape}")
    return PooledLinearHead(shape[0], num_classes)


def _tokens(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(shape) != 2:
        raise CutError(f"head 'token_pool' needs a (tokens, width) sequence, the exit carries {shape}")
    return TokenPoolHead(shape[1], num_classes)


def _flat(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return FlatLinearHead(math.prod(shape), num_classes)


def _auto(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Choose by rank: (C,H,W) → pool_linear, (T,D) → token_pool, anything else → linear."""
    if len(shape) == 3:
        return _pooled(shape, num_classes)
    if len(shape) == 2:
        return _tokens(shape, num_classes)
    return _flat(shape, num_classes)


# ---------------------------------------------------------------------------------------- confidence
def _max_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1).amax(dim=1)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """1 − normalised entropy: 1 for a one-hot distribution, 0 for a uniform one."""
    log_p = torch.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return (1.0 - entropy / math.log(logits.shape[1])).clamp(0.0, 1.0)


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = torch.softmax(logits, dim=1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


for _name, _builder in {"auto": _auto, "pool_linear": _pooled, "token_pool": _tokens, "linear": _flat}.items():
    register_head(_name, _builder)
for _name, _function in {"max_softmax": _max_softmax, "entropy": _entropy, "margin": _margin}.items():
    register_confidence(_name, _function)
