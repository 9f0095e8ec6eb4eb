"""Profile keys: each part of a stored profile is reused until what its key names changes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from splitexit import EarlyExitNet, save
from splitexit.app.plan import profile_package
from splitexit.config import DataSplit
from splitexit.plan.profile import PROFILE_FILE, load_profile
from splitexit.plan.profile_keys import exits_key


@pytest.fixture()
def package(tmp_path: Path, make_net: Callable[[int], EarlyExitNet]) -> Path:
    return save(make_net(1), tmp_path / "pkg", data=DataSplit(dataset="digits"))


def test_profile_is_reused_until_the_model_policy_or_settings_change(package: Path, caplog, fast: dict[str, Any],
                                                                     make_net: Callable[[int], EarlyExitNet]) -> None:
    first = profile_package(package, **fast)
    path = package / PROFILE_FILE
    assert not first.reused_timing and not first.reused_exits and path.is_file()
    written = path.stat().st_mtime_ns

    again = profile_package(package, **fast)
    assert again.reused_timing and again.reused_exits and path.stat().st_mtime_ns == written
    assert again.profile.to_json() == first.profile.to_json()

    other_sizes = profile_package(package, **{**fast, "batch_sizes": (1, 4)})
    assert not other_sizes.reused_timing and other_sizes.reused_exits
    assert set(load_profile(path).timing.segments[0].seconds) == {1, 4}

    net = make_net(1)
    net.set_policy(net.policy.model_copy(update={"thresholds": (math.inf, net.policy.thresholds[1])}))
    save(net, package, data=DataSplit(dataset="digits"))
    recalibrated = profile_package(package, **{**fast, "batch_sizes": (1, 4)})
    assert recalibrated.reused_timing and not recalibrated.reused_exits, "a new policy keeps the timing"
    assert not recalibrated.profile.exits.confident[0].any()

    retrained = make_net(2)
    save(retrained, package, data=DataSplit(dataset="digits"))
    changed = profile_package(package, **fast)
    assert not changed.reused_timing and not changed.reused_exits
    assert changed.profile.timing.key["weights_sha256"] == retrained.weights_sha256

    forced = profile_package(package, **fast, force=True)
    assert not forced.reused_timing and not forced.reused_exits

    path.write_text("not json")
    with caplog.at_level(logging.WARNING):
        repaired = profile_package(package, **fast)
    assert not repaired.reused_timing and "measuring again" in caplog.text
    assert load_profile(path).to_json() == repaired.profile.to_json()


def test_profile_keys_name_what_they_depend_on(net: EarlyExitNet, make_net: Callable[[int], EarlyExitNet]) -> None:
    key = exits_key(net, DataSplit(dataset="digits"))
    assert set(key) == {"weights_sha256", "policy", "split"}
    changed = make_net(0)
    changed.set_policy(changed.policy.model_copy(update={"temperatures": (1.0,) * changed.num_exits}))
    assert exits_key(changed, DataSplit(dataset="digits"))["policy"] != key["policy"]
    assert exits_key(net, DataSplit(dataset="digits", seed=3))["split"] != key["split"]

