"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    # The test models are tiny; with several intra-op threads on a shared machine, OpenMP contention
    # makes a 12x12 convolution take ~30 ms instead of ~0.2 ms. One thread keeps the unit tier well
    # under a minute. An explicit OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nodes started without --cache keep stage files under $XDG_CACHE_HOME: keep the tests' out of ~."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
