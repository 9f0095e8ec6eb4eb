"""Shared test settings."""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    # The test models are tiny; with several intra-op threads on a shared machine, OpenMP contention
    # makes a 12x12 convolution take ~30 ms instead of ~0.2 ms. One thread keeps the unit tier well
    # under a minute. An explicit OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
