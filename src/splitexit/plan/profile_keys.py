"""What a stored profile depends on: each part of ``profile.json`` carries a key, and a part whose key no
longer matches is measured again.

* **timing**: the package's weights sha256, torch version, memory format and thread count, batch sizes,
  codecs, candidate cuts, repeats, how timings are measured (:data:`TIMING_METHOD`) and this machine
  (:func:`machine_name`).
* **exits**: the weights sha256, the exit policy and the calibration split.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from splitexit.model.exits import EarlyExitNet

__all__ = ["TIMING_METHOD", "exits_key", "machine_name", "timing_key"]

#: Bumped whenever how timings are measured changes, so that stored timings are measured again.
TIMING_METHOD = 5
#: Where Linux names the CPU model (elsewhere the key falls back to :func:`platform.processor`).
CPUINFO = Path("/proc/cpuinfo")


def machine_name() -> str:
    """This machine as the profile key sees it: host name, CPU model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} / {cpu} / {os.cpu_count()} cores"


def timing_key(net: EarlyExitNet, cuts: Sequence[int], *, batch_sizes: Sequence[int], codecs: Sequence[str],
               repeats: int) -> dict[str, object]:
    """What the timing depends on; a stored timing with another key is measured again."""
    return {"method": TIMING_METHOD, "weights_sha256": net.weights_sha256, "torch": torch.__version__,
            "memory_format": net.cpu.memory_format, "threads": torch.get_num_threads(),
            "batch_sizes": list(batch_sizes), "codecs": list(codecs), "cuts": list(cuts), "repeats": repeats,
            "machine": machine_name()}


def exits_key(net: EarlyExitNet, split: object) -> dict[str, object]:
    """What the exit table depends on: the weights, the exit policy and the calibration split."""
    policy = hashlib.sha256(repr(net.policy.model_dump()).encode()).hexdigest()[:16]
    return {"weights_sha256": net.weights_sha256, "policy": policy, "split": repr(split)}
