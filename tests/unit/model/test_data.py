"""Datasets by spec, and the fixed disjoint split."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from splitexit import DataError, load_dataset, split_dataset
from splitexit.config import DataSplit, ImageInput


def test_digits_ships_with_scikit_learn() -> None:
    data = load_dataset("digits")
    assert len(data) == 1797 and data.sample_shape == (1, 8, 8) and data.num_classes == 10
    image, label = data.dataset[0]
    assert image.dtype == torch.float32 and 0 <= float(image.min()) and float(image.max()) <= 1 and int(label) == 0


def test_split_is_disjoint_complete_and_repeatable() -> None:
    data = load_dataset("digits")
    first, second = split_dataset(data), split_dataset(data)
    parts = [set(s.indices) for s in (first.train, first.calib, first.test)]
    assert sum(map(len, parts)) == len(data) == len(set().union(*parts))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert first.test.indices == second.test.indices
    other = split_dataset(data, DataSplit(dataset="digits", seed=1))
    assert other.test.indices != first.test.indices


def test_synthetic_spec() -> None:
    data = load_dataset("synthetic:3x16x16:20")
    assert len(data) == 20 and data.sample_shape == (3, 16, 16)
    assert torch.equal(data.dataset[0][0], load_dataset("synthetic:3x16x16:20").dataset[0][0])


@pytest.mark.parametrize("spec", ["synthetic:3xAx4", "synthetic:0x4", "synthetic:3x4:-1", "nonsense"])
def test_bad_specs_are_explained(spec: str) -> None:
    with pytest.raises(DataError):
        load_dataset(spec)


def image_folder(root: Path) -> Path:
    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / label).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(root / label / f"{i}.png")
    return root


def test_image_folder(tmp_path: Path) -> None:
    data = load_dataset(f"folder:{image_folder(tmp_path)}")
    assert len(data) == 6 and data.num_classes == 2 and data.sample_shape == (3, 224, 224)
    assert data.class_names == ("cat", "dog") and data.images == ImageInput()


def test_image_folder_at_the_size_and_channels_asked(tmp_path: Path) -> None:
    data = load_dataset(f"folder:{image_folder(tmp_path)}?size=16&channels=1&normalize=none")
    assert data.sample_shape == (1, 16, 16) and data.images == ImageInput(size=16, channels=1, normalize="none")
    image, label = data.dataset[3]  # a dog: pure blue, whose grey level is 0.114 * 255 / 255
    assert int(label) == 1 and torch.allclose(image, torch.full((1, 16, 16), 29 / 255), atol=1 / 255)


@pytest.mark.parametrize("query, phrase", [
    ("sise=16", "unknown option 'sise'; did you mean 'size'?"),
    ("size", "write its options as key=value joined by &"),
    ("size=0", "size: Input should be greater than or equal to 1"),
    ("channels=2", "channels: Input should be 1 or 3"),
    ("normalize=imagenet1k", "normalize: Input should be 'imagenet' or 'none'"),
])
def test_bad_folder_options_name_the_option(tmp_path: Path, query: str, phrase: str) -> None:
    with pytest.raises(DataError, match=re.escape(phrase)):
        load_dataset(f"folder:{image_folder(tmp_path)}?{query}")


def test_digits_name_their_classes() -> None:
    assert load_dataset("digits").class_names == tuple("0123456789")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'absent'}")


def test_user_factory_from_a_file(tmp_path: Path) -> None:
    source = tmp_path / "mydata.py"
    source.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    return TensorDataset(torch.ones(5, 2, 3), torch.zeros(5, dtype=torch.long))\n"
        "def broken():\n"
        "    return [1, 2, 3]\n"
    )
    data = load_dataset(f"{source}:make")
    assert len(data) == 5 and data.sample_shape == (2, 3)
    with pytest.raises(DataError, match="pairs"):
        load_dataset(f"{source}:broken")
