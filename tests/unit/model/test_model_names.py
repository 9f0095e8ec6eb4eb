"""A misspelt model name is answered with the closest known one (built-in or torchvision)."""

from __future__ import annotations

import pytest

from splitexit.errors import UnknownModelError
from splitexit.model.zoo import build_model


def test_a_misspelt_model_name_gets_the_closest_one() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'mobilenet_v3_smal'; did you mean "
                                                "'mobilenet_v3_small'\\? Built-in: digits_cnn"):
        build_model("mobilenet_v3_smal")
    with pytest.raises(UnknownModelError, match=r"unknown model 'zzzz'\. Built-in"):
        build_model("zzzz")
