"""Ctrl-C during `splitexit run` keeps what was answered: results, report and a clear line (issue 15)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from splitexit import save
from support import digits_net, free_port

pytestmark = pytest.mark.slow

#: Seconds into the run before Ctrl-C: past start-up (imports, placing the stage), long before the end.
INTERRUPT_AFTER = 12.0


def test_ctrl_c_during_run_writes_what_was_answered(tmp_path: Path) -> None:
    save(digits_net(exit_quantile=1.0), tmp_path / "pkg")  # nothing exits early: every input visits cloud1
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({  # 50 ms each way, one request at a time: 360 inputs take ~40 s
        "package": "pkg", "window": 1,
        "nodes": [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "latency": "50ms"}]}))
    up = subprocess.Popen([sys.executable, "-m", "splitexit", "up", "--cluster", str(cluster_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "cluster up" in (up.stdout.readline() if up.stdout else ""), up.stderr.read() if up.stderr else ""
        results, table, report = tmp_path / "results.jsonl", tmp_path / "results.csv", tmp_path / "report"
        run = subprocess.Popen([sys.executable, "-m", "splitexit", "run", "--cluster", str(cluster_file), "--no-plan",
                                "--data", "digits", "--out", str(results), "--csv", str(table),
                                "--report", str(report)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(INTERRUPT_AFTER)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    answered = [json.loads(line) for line in results.read_text().splitlines()]
    assert 0 < len(answered) < 360, len(answered)
    assert f"interrupted after {len(answered)}/360 inputs" in " ".join(stderr.split())
    assert all(r["error"] is None for r in answered)
    assert f"interrupted after {len(answered)}/360 inputs" in (report / "report.html").read_text()
    assert json.loads((report / "report.json").read_text())["interrupted_of"] == 360
    assert len(table.read_text().splitlines()) == 1 + len(answered), "the CSV holds the same partial run"
