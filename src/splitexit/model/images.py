"""Image files as model inputs: the options of a ``folder:PATH?size=64&channels=1`` spec, and the one
transform that training, evaluation and ``splitexit infer`` all use, so an image is prepared the same way
wherever it is read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from pydantic import ValidationError

from splitexit.config import ImageInput
from splitexit.config.base import describe_validation_error, did_you_mean
from splitexit.errors import DataError

__all__ = ["image_transform", "parse_folder_spec", "read_image"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_OPTIONS = list(ImageInput.model_fields)


def parse_folder_spec(spec: str) -> tuple[Path, ImageInput]:
    """``folder:PATH[?size=N&channels=1|3&normalize=imagenet|none]`` -> the folder and how its images are read."""
    path, _, query = spec.removeprefix("folder:").partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DataError(f"dataset {spec!r}: write its options as key=value joined by &, e.g. "
                        f"folder:{path}?size=64&channels=1") from None
    options: dict[str, str | int] = {}
    for key, value in pairs:
        if key not in _OPTIONS:
            raise DataError(f"dataset {spec!r}: unknown option {key!r}{did_you_mean(key, _OPTIONS)} (the options "
                            f"are {', '.join(_OPTIONS)}, e.g. folder:{path}?size=64&channels=1)")
        options[key] = int(value) if value.isdigit() else value  # a URL query is text; sizes are numbers
    try:
        return Path(path), ImageInput.model_validate(options)
    except ValidationError as exc:
        raise DataError(f"dataset {spec!r}: {describe_validation_error(exc)}") from None


def image_transform(images: ImageInput) -> Callable[[object], torch.Tensor]:
    """RGB PIL image (as ImageFolder loads them) -> tensor of shape (channels, size, size): resize the
    shorter side, centre crop, scale to [0, 1], normalise (ImageNet's mean and std, averaged for one channel)."""
    from torchvision import transforms

    steps = [transforms.Resize(images.size), transforms.CenterCrop(images.size), transforms.ToTensor()]
    if images.channels == 1:
        steps.insert(0, transforms.Grayscale(1))
    if images.normalize == "imagenet":
        mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if images.channels == 3 else \
            ((sum(_IMAGENET_MEAN) / 3,), (sum(_IMAGENET_STD) / 3,))
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def read_image(path: Path, images: ImageInput) -> torch.Tensor:
    """One image file as a model input of shape (channels, size, size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image_transform(images)(image.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read {path} as an image (PNG, JPEG and the other formats Pillow reads): "
                        f"{exc}") from None

