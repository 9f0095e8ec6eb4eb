"""Models by name: unknown names list the choices; user factories load from modules and files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitexit import (
    ConfigError,
    UnknownModelError,
    build_model,
    list_models,
    register_model,
)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(UnknownModelError) as info:
        build_model("resnet_51")
    message = str(info.value)
    assert "digits_cnn" in message and "resnet18" in message and "module:factory" in message


def test_builtins_are_listed_and_torchvision_names_too() -> None:
    assert "digits_cnn" in list_models()
    assert {"resnet18", "vit_b_16"} <= set(list_models(include_torchvision=True))


def test_torchvision_model_gets_the_number_of_classes() -> None:
    model = build_model("mobilenet_v3_small", num_classes=7).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_user_factory_from_a_file_with_and_without_num_classes(tmp_path: Path) -> None:
    source = tmp_path / "mymodels.py"
    source.write_text(
        "from torch import nn\n"
        "def small(num_classes=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))\n"
        "def fixed():\n"
        "    return nn.Linear(4, 2)\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    assert build_model(f"{source}:small", num_classes=5)(torch.zeros(1, 4)).shape == (1, 5)
    assert isinstance(build_model(f"{source}:fixed", num_classes=5), torch.nn.Linear)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_model(f"{source}:not_a_model")
    with pytest.raises(ConfigError, match="has no 'absent'"):
        build_model(f"{source}:absent")


def test_user_factory_from_a_module() -> None:
    model = build_model("torch.nn:Identity")
    assert isinstance(model, torch.nn.Identity)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_model("digits_cnn", lambda n: torch.nn.Identity(), input_shape=(1,), num_classes=2)
