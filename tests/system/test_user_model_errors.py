"""A user's model that does not fit the data says so in one line (issue 15: it was a 265-line traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_model_expecting_other_channels_than_the_data_is_one_clear_line(tmp_path: Path) -> None:
    code = tmp_path / "rgbnet.py"
    code.write_text("from torch import nn\n"
                    "def build(num_classes=10):\n"
                    "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
                    "                         nn.Linear(8 * 8 * 8, num_classes))\n")
    result = subprocess.run([sys.executable, "-m", "splitexit", "train", "--model", f"{code}:build", "--data", "digits",
                             "--out", str(tmp_path / "pkg"), "--epochs", "1"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr
    message = " ".join(result.stderr.split())
    assert "cannot run on one input of shape (1, 8, 8)" in message and "module '0'" in message
    assert "expected input" in message and "3 channels" in message
