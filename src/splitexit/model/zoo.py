"""Models by name: built-ins, torchvision classifiers, and the user's own `module:factory`.

Each built-in is registered with a builder and the input shape it expects, so tests parametrise over
``list_models()`` and every new entry is exercised automatically.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from splitexit.config.base import did_you_mean
from splitexit.errors import ConfigError, UnknownModelError
from splitexit.model.importing import import_object, is_import_spec

__all__ = ["ModelEntry", "build_model", "default_input_shape", "list_models", "register_model"]

IMAGENET_INPUT = (3, 224, 224)
DEFAULT_CLASSES = 1000


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[[int], nn.Module]  # num_classes -> model
    input_shape: tuple[int, ...]
    num_classes: int


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[[int], nn.Module], *, input_shape: tuple[int, ...],
                   num_classes: int) -> None:
    """Add a built-in model; names must be unique."""
    if name in _MODELS:
        raise ConfigError(f"a model named {name!r} is already registered")
    _MODELS[name] = ModelEntry(builder, input_shape, num_classes)


def list_models(*, include_torchvision: bool = False) -> list[str]:
    names = sorted(_MODELS)
    if include_torchvision:
        names += _torchvision_classifiers()
    return names


def default_input_shape(name: str) -> tuple[int, ...] | None:
    """The input shape a named model expects, or None for user models (ask the dataset)."""
    if name in _MODELS:
        return _MODELS[name].input_shape
    if name in _torchvision_classifiers():
        return IMAGENET_INPUT
    return None


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build a model by built-in name, torchvision name, or `module:factory` / `file.py:factory`.

    Weights are random (nothing is downloaded); load your own with `splitexit train --weights`.
    """
    if name in _MODELS:
        entry = _MODELS[name]
        return entry.builder(num_classes or entry.num_classes)
    if name in _torchvision_classifiers():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes or DEFAULT_CLASSES)
    if is_import_spec(name):
        return _from_factory(name, num_classes)
    raise _unknown_model(name)


def _unknown_model(name: str) -> UnknownModelError:
    """The error for a model name that is none of ours, with the closest name if it looks like a typo."""
    choices = ", ".join(list_models())
    hint = did_you_mean(name, list_models(include_torchvision=True))
    return UnknownModelError(
        f"unknown model {name!r}{hint}{' ' if hint else '. '}Built-in: {choices}; torchvision classifiers such as "
        f"resnet18, resnet50, mobilenet_v3_small, vit_b_16 (all {len(_torchvision_classifiers())} are listed by "
        "`splitexit models`); or your own as module:factory or path/to/file.py:factory."
    )


def _from_factory(spec: str, num_classes: int | None) -> nn.Module:
    factory = import_object(spec, what="model factory")
    if not callable(factory):
        raise ConfigError(f"{spec} is not callable; it must be a function or class returning an nn.Module")
    accepts_classes = "num_classes" in _parameters(factory)
    model = factory(num_classes=num_classes) if accepts_classes and num_classes else factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _parameters(function: Callable) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def _torchvision_classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8×8 digits: two conv blocks, then a classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.block4 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 2 * 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block4(self.block3(self.block2(self.block1(x)))))


register_model("digits_cnn", DigitsCNN, input_shape=(1, 8, 8), num_classes=10)
