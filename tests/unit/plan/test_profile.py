"""Profiles: exit routing simulated exactly as Stage routes, measurements stored and reused until stale."""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from splitexit import (
    EarlyExitNet,
    ExitPolicy,
    build_model,
    load_dataset,
    save,
    split_dataset,
)
from splitexit.app.plan import profile_package
from splitexit.config import DataSplit, ModelSource
from splitexit.errors import PackageError
from splitexit.model.heads import confidence_function
from splitexit.plan.profile import (
    PROFILE_FILE,
    Timing,
    candidate_cuts,
    exits_key,
    load_profile,
    measure_exits,
    measure_idle_factors,
    measure_timing,
    save_profile,
)

FAST = {"batch_sizes": (1, 2), "codecs": ("raw", "int8+zstd"), "repeats": 3}


def digits_net(seed: int = 0) -> EarlyExitNet:
    """digits_cnn with random weights and thresholds between two samples' scores (no ties at the threshold)."""
    torch.manual_seed(seed)
    net = EarlyExitNet.from_model(build_model("digits_cnn", 10), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    calib = split_dataset(load_dataset("digits")).calib
    x = torch.stack([calib[i][0] for i in range(len(calib))])
    with torch.no_grad():
        outputs = net(x)
    temperatures = (0.05,) * net.num_exits
    thresholds = []
    for logits in outputs[:-1]:
        scores = np.sort(confidence_function("max_softmax")(logits / 0.05).numpy())
        middle = len(scores) // 2
        thresholds.append(float((scores[middle] + scores[middle + 1]) / 2))
    net.set_policy(ExitPolicy(temperatures=temperatures, thresholds=tuple(thresholds)))
    return net


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    return digits_net()


@pytest.fixture(scope="module")
def calib():
    return split_dataset(load_dataset("digits")).calib


def test_exit_table_routes_every_sample_like_the_stages_do(net: EarlyExitNet, calib) -> None:
    table = measure_exits(net, calib, key={})
    assert table.samples == len(calib) and table.early_exits == net.num_exits - 1
    x = torch.stack([calib[i][0] for i in range(len(calib))])
    labels = torch.tensor([int(calib[i][1]) for i in range(len(calib))])
    policy = net.policy
    exits = range(net.num_exits - 1)
    try:
        for active in itertools.chain.from_iterable(itertools.combinations(exits, r) for r in range(len(exits) + 1)):
            thresholds = tuple(t if i in active else math.inf for i, t in enumerate(policy.thresholds))
            net.set_policy(policy.model_copy(update={"thresholds": thresholds}))
            served = net.infer(x)
            simulated = table.route(active)
            assert simulated.tolist() == served.exit.tolist(), f"active exits {active}"
            assert len(set(simulated.tolist())) == len(active) + 1, "every active exit should answer someone"
            accuracy = float((served.prediction == labels).double().mean())
            assert math.isclose(table.accuracy(active), accuracy)
            # and across a split, as a chain of stages runs it
            cut = net.exit_cuts[0].id
            with torch.inference_mode():
                first = net.stage(None, cut).run((x,))
                second = net.stage(cut, None).run(first.forward)
            exit_of = torch.empty(len(x), dtype=torch.int64)
            exit_of[first.rows] = first.exit
            exit_of[first.forward_rows[second.rows]] = second.exit
            assert exit_of.tolist() == simulated.tolist()
    finally:
        net.set_policy(policy)


def test_candidate_cuts_keep_exits_and_coarsen_big_models(net: EarlyExitNet) -> None:
    every = candidate_cuts(net)
    assert every == tuple(c.id for c in net.graph.cut_points)
    few = candidate_cuts(net, limit=5)
    assert len(few) <= 5 and list(few) == sorted(few)
    assert {c.id for c in net.exit_cuts} <= set(few)
    exits = {c.id for c in net.exit_cuts}
    bins = 5 - len(exits)
    total = net.graph.total_flops
    slot = {c.id: min(bins - 1, int(bins * c.flops_before / total)) for c in net.graph.cut_points}
    for kept in set(few) - exits:
        rivals = [c.bytes_per_sample for c in net.graph.cut_points if slot[c.id] == slot[kept] and c.id not in exits]
        assert net.graph.cut(kept).bytes_per_sample == min(rivals), "each FLOP bin keeps its narrowest cut"
    assert len(set(few) - exits) == len({slot[c] for c in few if c not in exits})


def test_timing_covers_every_segment_head_and_codec(net: EarlyExitNet, calib) -> None:
    cuts = candidate_cuts(net, limit=6)
    x = torch.stack([calib[i][0] for i in range(16)])
    timing = measure_timing(net, x, cuts, **FAST)
    assert [(s.start, s.end) for s in timing.segments] == list(zip([None, *cuts], [*cuts, None]))
    assert sum(s.flops for s in timing.segments) == net.graph.total_flops
    assert len(timing.heads) == net.num_exits and timing.heads[-1].cut is None
    assert [t.cut for t in timing.transfers] == [None, *cuts]
    for segment in timing.segments:
        assert set(segment.seconds) == {1, 2} and all(t.median > 0 and t.q1 <= t.median <= t.q3
                                                      for t in segment.seconds.values())
    widest = max(timing.transfers, key=lambda t: t.raw_bytes)
    raw, packed = widest.codecs["raw"], widest.codecs["int8+zstd"]
    assert raw.bytes >= widest.raw_bytes and packed.bytes < raw.bytes / 3
    assert timing.transfers[0].raw_bytes == 64 * 4


def test_profile_survives_json_and_interpolates_batches(tmp_path: Path) -> None:
    from synthetic import synthetic_profile

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


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    return save(digits_net(1), tmp_path / "pkg", data=DataSplit(dataset="digits"))


def test_profile_is_reused_until_the_model_policy_or_settings_change(package: Path, caplog) -> None:
    first = profile_package(package, **FAST)
    path = package / PROFILE_FILE
    assert not first.reused_timing and not first.reused_exits and path.is_file()
    written = path.stat().st_mtime_ns

    again = profile_package(package, **FAST)
    assert again.reused_timing and again.reused_exits and path.stat().st_mtime_ns == written
    assert again.profile.to_json() == first.profile.to_json()

    other_sizes = profile_package(package, **{**FAST, "batch_sizes": (1, 4)})
    assert not other_sizes.reused_timing and other_sizes.reused_exits
    assert set(load_profile(path).timing.segments[0].seconds) == {1, 4}

    net = digits_net(1)
    net.set_policy(net.policy.model_copy(update={"thresholds": (math.inf, net.policy.thresholds[1])}))
    save(net, package, data=DataSplit(dataset="digits"))
    recalibrated = profile_package(package, **{**FAST, "batch_sizes": (1, 4)})
    assert recalibrated.reused_timing and not recalibrated.reused_exits, "a new policy keeps the timing"
    assert not recalibrated.profile.exits.confident[0].any()

    retrained = digits_net(2)
    save(retrained, package, data=DataSplit(dataset="digits"))
    changed = profile_package(package, **FAST)
    assert not changed.reused_timing and not changed.reused_exits
    assert changed.profile.timing.key["weights_sha256"] == retrained.weights_sha256

    forced = profile_package(package, **FAST, force=True)
    assert not forced.reused_timing and not forced.reused_exits

    path.write_text("not json")
    with caplog.at_level(logging.WARNING):
        repaired = profile_package(package, **FAST)
    assert not repaired.reused_timing and "measuring again" in caplog.text
    assert load_profile(path).to_json() == repaired.profile.to_json()


def test_profile_keys_name_what_they_depend_on(net: EarlyExitNet) -> None:
    key = exits_key(net, DataSplit(dataset="digits"))
    assert set(key) == {"weights_sha256", "policy", "split"}
    changed = digits_net(0)
    changed.set_policy(changed.policy.model_copy(update={"temperatures": (1.0,) * changed.num_exits}))
    assert exits_key(changed, DataSplit(dataset="digits"))["policy"] != key["policy"]
    assert exits_key(net, DataSplit(dataset="digits", seed=3))["split"] != key["split"]


def test_idle_factors_compare_paired_calls_and_never_fall_with_a_longer_pause() -> None:
    """A call that runs twice as long after more than 5 ms of rest: the factor says so from that pause on."""
    last_finished = [0.0]

    def call() -> None:
        rested = time.perf_counter() - last_finished[0]
        time.sleep(0.004 if rested > 0.005 else 0.002)
        last_finished[0] = time.perf_counter()

    factors = measure_idle_factors(call, warmup=1, gaps=(0.001, 0.01, 0.03), rounds=5)
    assert list(factors) == [0.001, 0.01, 0.03]
    assert 1.0 <= factors[0.001] < 1.4, factors
    assert 1.6 < factors[0.01] <= factors[0.03] < 2.5, factors
