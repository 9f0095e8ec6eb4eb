"""The shared text and JSON forms: every table, page and JSON object uses these."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from splitexit.report.formats import format_bytes, format_flops, json_line, jsonable


@pytest.mark.parametrize(("value", "text"), [(0, "0 B"), (310, "310 B"), (1536, "1.5 KiB"), (3 << 20, "3.0 MiB")])
def test_bytes_use_binary_units(value: float, text: str) -> None:
    assert format_bytes(value) == text


@pytest.mark.parametrize(("value", "text"), [(512, "512"), (2.4e6, "2.40 M"), (1.2e9, "1.20 G"), (1500, "1.50 k")])
def test_flops_use_decimal_units(value: float, text: str) -> None:
    assert format_flops(value) == text


def test_json_is_strict_and_plain() -> None:
    data = {"inf": math.inf, "nan": float("nan"), "np": np.float32(0.5), "n": np.int64(3), "flag": np.bool_(True),
            "nested": [(1, math.inf)], 2: "int key"}
    assert jsonable(data) == {"inf": None, "nan": None, "np": 0.5, "n": 3, "flag": True, "nested": [[1, None]],
                              "2": "int key"}
    line = json_line(data)
    assert "\n" not in line and json.loads(line)["inf"] is None
