"""What the calibrate and eval tables say a package's calibration promises, from its recorded metadata."""

from __future__ import annotations

from splitexit.report.console import promise_text


def test_the_promise_names_its_level_target_and_bound_or_says_there_is_none() -> None:
    certified = {"mode": "max_drop", "target": 0.01, "samples": 359, "guarantee": 0.95, "bound": 0.0083}
    assert promise_text(certified) == ("promise (95%): drop <= 1.00% on new data; certified bound 0.83% "
                                       "from 359 samples")
    nothing = {**certified, "bound": None}
    assert promise_text(nothing) == "promise (95%): nothing certified on 359 samples, so no early exits"
    point = {"mode": "max_drop", "target": 0.01, "samples": 359}
    assert promise_text(point) is not None and promise_text(point).startswith("no promise")
    assert promise_text({"mode": "budget", "target": 0.5}) is None and promise_text({}) is None
