"""The demo's terminal view: one rule per step, the training bar closed before the next step."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from splitexit.app.demo import DemoPaths, DemoStep
from splitexit.model.train import EpochResult
from splitexit.report.demo_console import DemoConsole


def test_every_step_has_a_title_and_the_bar_closes() -> None:
    out = Console(file=io.StringIO(), width=200)
    err = Console(file=io.StringIO(), width=200)
    with DemoConsole(DemoPaths(Path("W")), out, err) as view:
        for step in DemoStep:
            view.begin(step)
            if step is DemoStep.TRAIN:
                view.epoch(EpochResult(1, 2, 0.5, (0.9, 0.95)))
                assert view._bar is not None
        assert view._bar is None
    text = out.file.getvalue()  # type: ignore[attr-defined]
    for phrase in ("1. train digits_cnn", "1. reuse the trained package in W/digits_cnn", "2. calibrate",
                   "within 1 point", "3. evaluate", "4. plan", "2 ms uplink (W/cluster.yaml)",
                   "5. serve the plan; 1 s in"):
        assert phrase in text, f"{phrase!r} not in:\n{text}"
