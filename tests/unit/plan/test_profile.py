"""Profile records: they survive JSON, interpolate between batch sizes, and a broken file says what to run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from splitexit.errors import PackageError
from splitexit.plan.profile import PROFILE_FILE, Timing, load_profile, save_profile
from synthetic import synthetic_profile


def test_profile_survives_json_and_interpolates_batches(tmp_path: Path) -> None:
    profile = synthetic_profile(0)
    path = save_profile(profile, tmp_path / PROFILE_FILE)
    again = load_profile(path)
    assert again.to_json() == profile.to_json()
    assert np.array_equal(again.exits.confident, profile.exits.confident)
    json.loads(path.read_text())  # strict JSON: no NaN or Infinity
    segment = profile.timing.segments[0]
    one, eight = segment.seconds[1].median, segment.seconds[8].median
    assert math.isclose(segment.at(4), one + (eight - one) * 3 / 7)
    assert math.isclose(segment.at(16), one + (eight - one) * 15 / 7)
    assert Timing.of([1, 2, 3, 4, 100]).median == 3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PackageError, match="splitexit profile"):
        load_profile(tmp_path / "bad.json")

