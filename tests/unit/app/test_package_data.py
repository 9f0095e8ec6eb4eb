"""One rule picks a package command's dataset, and it always checks the sample shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from splitexit.app.package_data import package_dataset
from splitexit.config import DataSplit
from splitexit.errors import DataError

PACKAGE = Path("P")


def net(shape: tuple[int, ...]) -> SimpleNamespace:
    return SimpleNamespace(input_shape=shape)


def test_the_flag_wins_and_the_recorded_split_is_kept() -> None:
    recorded = DataSplit(dataset="synthetic:1x4x4:30", seed=7, fractions=(0.5, 0.25, 0.25))
    dataset, split = package_dataset(PACKAGE, net((1, 4, 4)), recorded, "synthetic:1x4x4:12")  # type: ignore[arg-type]
    assert len(dataset) == 12
    assert split == DataSplit(dataset="synthetic:1x4x4:12", seed=7, fractions=(0.5, 0.25, 0.25))


def test_the_recorded_dataset_is_the_default() -> None:
    recorded = DataSplit(dataset="synthetic:1x4x4:30")
    dataset, split = package_dataset(PACKAGE, net((1, 4, 4)), recorded, None)  # type: ignore[arg-type]
    assert len(dataset) == 30 and split == recorded


def test_a_dataset_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(DataError, match="shape"):
        package_dataset(PACKAGE, net((1, 8, 8)), DataSplit(dataset="synthetic:1x4x4:30"), None)  # type: ignore[arg-type]


def test_no_dataset_anywhere_names_the_flag() -> None:
    with pytest.raises(DataError, match="--data"):
        package_dataset(PACKAGE, net((1, 4, 4)), None, None)  # type: ignore[arg-type]
