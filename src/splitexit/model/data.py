"""Datasets by spec string, and the fixed split into disjoint train / calibration / test parts.

Specs: ``digits`` (scikit-learn's bundled 8×8 digits, no download), ``folder:PATH`` (an ImageFolder; options
``?size=N&channels=1|3&normalize=imagenet|none``, see :mod:`splitexit.model.images`),
``synthetic:CxHxW[:N]`` (seeded random tensors, for timing), and ``module:factory`` /
``file.py:factory`` returning a ``torch.utils.data.Dataset`` of ``(tensor, label)`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from splitexit.config import DEFAULT_SPLIT_FRACTIONS, DEFAULT_SPLIT_SEED, DataSplit, ImageInput
from splitexit.errors import DataError
from splitexit.model.images import image_transform, parse_folder_spec
from splitexit.model.importing import import_object, is_import_spec
from splitexit.units import parse_shape

__all__ = ["LoadedDataset", "Splits", "list_datasets", "load_dataset", "split_dataset"]

SYNTHETIC_SAMPLES = 256
SYNTHETIC_CLASSES = 10
DIGIT_NAMES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class LoadedDataset:
    spec: str
    dataset: Dataset
    num_classes: int | None
    sample_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None  # index order, where the dataset names its classes
    images: ImageInput | None = None  # how image files were prepared, for a folder of images

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__


@dataclass(frozen=True)
class Splits:
    train: Subset
    calib: Subset
    test: Subset

    def get(self, name: str) -> Dataset:
        if name == "all":
            return torch.utils.data.ConcatDataset([self.train, self.calib, self.test])
        if name not in ("train", "calib", "test"):
            raise DataError(f"unknown split {name!r}; use train, calib, test or all")
        return getattr(self, name)


def list_datasets() -> list[str]:
    return ["digits", "folder:PATH[?size=N&channels=1|3&normalize=imagenet|none]", "synthetic:CxHxW[:N]",
            "module:factory", "path/file.py:factory"]


def load_dataset(spec: str) -> LoadedDataset:
    classes: int | None
    names: tuple[str, ...] | None = None
    images: ImageInput | None = None
    if spec == "digits":
        dataset, classes, names = _digits(), 10, DIGIT_NAMES
    elif spec.startswith("folder:"):
        path, images = parse_folder_spec(spec)
        dataset, names = _folder(path, images)
        classes = len(names)
    elif spec.startswith("synthetic:"):
        dataset, classes = _synthetic(spec), SYNTHETIC_CLASSES
    elif is_import_spec(spec):
        dataset, classes, names = _from_factory(spec)
    else:
        raise DataError(f"unknown dataset {spec!r}; use one of: {', '.join(list_datasets())}")
    if len(dataset) == 0:  # type: ignore[arg-type]  # torch's Dataset declares no __len__
        raise DataError(f"dataset {spec!r} is empty")
    sample = _check_item(dataset[0], spec)
    return LoadedDataset(spec, dataset, classes, tuple(sample.shape), names, images)


def split_dataset(data: LoadedDataset, split: DataSplit | None = None) -> Splits:
    """Disjoint train / calibration / test subsets from a seeded permutation (the same every time)."""
    split = split or DataSplit(dataset=data.spec, seed=DEFAULT_SPLIT_SEED, fractions=DEFAULT_SPLIT_FRACTIONS)
    total = len(data)
    if total < 3:
        raise DataError(f"dataset {data.spec!r} has {total} samples; at least 3 are needed to split it")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(split.seed)).tolist()
    n_train = max(1, int(round(split.fractions[0] * total)))
    n_calib = max(1, int(round(split.fractions[1] * total)))
    n_train = min(n_train, total - 2)
    n_calib = min(n_calib, total - n_train - 1)
    return Splits(train=Subset(data.dataset, order[:n_train]),
                  calib=Subset(data.dataset, order[n_train:n_train + n_calib]),
                  test=Subset(data.dataset, order[n_train + n_calib:]))


def _digits() -> Dataset:
    from sklearn.datasets import (
        load_digits,  # bundled with scikit-learn: nothing is downloaded
    )

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return TensorDataset(images, torch.tensor(bunch.target, dtype=torch.int64))


def _folder(path: Path, images: ImageInput) -> tuple[Dataset, tuple[str, ...]]:
    from torchvision import datasets

    if not path.is_dir():
        raise DataError(f"folder dataset {path} does not exist or is not a directory")
    try:
        dataset = datasets.ImageFolder(str(path), transform=image_transform(images))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read {path} as an image folder (one sub-folder of images per class): "
                        f"{exc}") from exc
    return dataset, tuple(dataset.classes)


def _synthetic(spec: str) -> Dataset:
    parts = spec.removeprefix("synthetic:").split(":")
    try:
        shape = parse_shape(parts[0])
        count = int(parts[1]) if len(parts) > 1 else SYNTHETIC_SAMPLES
    except ValueError as exc:
        raise DataError(f"bad synthetic spec {spec!r}; write synthetic:CxHxW or synthetic:CxHxW:N, "
                        "e.g. synthetic:3x224x224:64") from exc
    if len(parts) > 2 or count <= 0:
        raise DataError(f"bad synthetic spec {spec!r}; write synthetic:CxHxW or synthetic:CxHxW:N")
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, *shape, generator=generator)
    labels = torch.randint(0, SYNTHETIC_CLASSES, (count,), generator=generator)
    return TensorDataset(inputs, labels)


def _from_factory(spec: str) -> tuple[Dataset, int | None, tuple[str, ...] | None]:
    factory = import_object(spec, what="dataset factory")
    dataset = factory() if callable(factory) and not isinstance(factory, Dataset) else factory
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DataError(f"{spec} returned {type(dataset).__name__}; it must return a torch Dataset "
                        "with __len__ and __getitem__ giving (tensor, label)")
    classes = getattr(dataset, "classes", None)  # torchvision's datasets name their classes here
    names = tuple(classes) if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes) \
        else None
    return cast(Dataset, dataset), len(classes) if classes is not None else None, names  # map-style, checked above


def _check_item(item: object, spec: str) -> torch.Tensor:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
        raise DataError(f"dataset {spec!r} must yield (tensor, label) pairs; its first item is "
                        f"{type(item).__name__}")
    return item[0]
