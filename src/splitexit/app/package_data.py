"""The dataset a command on a package reads: one rule for calibrate, eval, profile and run."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from splitexit.config import DataSplit
from splitexit.errors import DataError
from splitexit.model.data import LoadedDataset, load_dataset
from splitexit.model.exits import EarlyExitNet
from splitexit.model.importing import is_import_spec, is_trusted

__all__ = ["DEFAULT_SPLIT", "package_dataset"]

#: The split `eval` and `run` read unless told otherwise: the one training and calibration never saw.
DEFAULT_SPLIT = "test"


def package_dataset(package: Path, net: EarlyExitNet, recorded: DataSplit | None, requested: str | None,
                    trust_models: Collection[str] = ()) -> tuple[LoadedDataset, DataSplit]:
    """The dataset to use (``--data`` first, then the one recorded at training) and the split to cut it with.

    The split keeps the recorded seed and fractions, so "test" is the same samples as at training. A
    dataset whose samples do not fit the model is refused here, before any compute. A recorded dataset
    from user code is imported only if it is in ``trust_models`` (the package chose it, not the user).
    """
    name = requested or (recorded.dataset if recorded else None)
    if name is None:
        raise DataError(f"{package} records no dataset; pass --data (e.g. --data digits)")
    if requested is None and is_import_spec(name) and not is_trusted(name, trust_models):
        raise DataError(f"{package} records the dataset {name!r}, code this command was not told to trust; pass "
                        f"--data {name} or --trust-model {name} if you wrote or checked it")
    dataset = load_dataset(name)
    if dataset.sample_shape != tuple(net.input_shape):
        raise DataError(f"dataset {name!r} gives samples of shape {dataset.sample_shape}, but {package} expects "
                        f"{tuple(net.input_shape)}; pass the dataset the package was trained on.")
    split = DataSplit(dataset=name, seed=recorded.seed, fractions=recorded.fractions) if recorded \
        else DataSplit(dataset=name)
    return dataset, split
