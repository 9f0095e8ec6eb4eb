"""Shared for the plan tests that need a real model: digits_cnn with thresholds between two samples' scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from splitexit import EarlyExitNet, ExitPolicy, build_model, load_dataset, split_dataset
from splitexit.config import ModelSource
from splitexit.model.heads import confidence_function

#: Settings that keep a profile quick: two batch sizes, two codecs, three runs.
FAST = {"batch_sizes": (1, 2), "codecs": ("raw", "int8+zstd"), "repeats": 3}


def digits_net(seed: int = 0) -> EarlyExitNet:
    """digits_cnn with random weights and thresholds between two samples' scores (no ties at the threshold)."""
    torch.manual_seed(seed)
    net = EarlyExitNet.from_model(build_model("digits_cnn", 10), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    calib = split_dataset(load_dataset("digits")).calib
    x = torch.stack([calib[i][0] for i in range(len(calib))])
    with torch.no_grad():
        outputs = net(x)
    temperatures = (0.05,) * net.num_exits
    thresholds = []
    for logits in outputs[:-1]:
        scores = np.sort(confidence_function("max_softmax")(logits / 0.05).numpy())
        middle = len(scores) // 2
        thresholds.append(float((scores[middle] + scores[middle + 1]) / 2))
    net.set_policy(ExitPolicy(temperatures=temperatures, thresholds=tuple(thresholds)))
    return net


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    return digits_net()


@pytest.fixture(scope="module")
def calib():
    return split_dataset(load_dataset("digits")).calib


@pytest.fixture(scope="module")
def make_net() -> Callable[[int], EarlyExitNet]:
    """A fresh digits net per seed (tests that change the weights or policy)."""
    return digits_net


@pytest.fixture()
def fast() -> dict[str, Any]:
    return dict(FAST)
