"""The public API is explicit and importing it has no side effects."""

from __future__ import annotations

import subprocess
import sys

import splitexit

EXPECTED = [
    "CalibrationError",
    "CalibrationReport",
    "ClusterError",
    "ClusterSpec",
    "ConfigError",
    "CpuSettings",
    "CutError",
    "CutPoint",
    "DataError",
    "DataSplit",
    "EarlyExitNet",
    "Entry",
    "EntryClient",
    "EvalReport",
    "ExitPolicy",
    "InferenceResult",
    "IntegrityError",
    "ModelError",
    "ModelGraph",
    "ModelSource",
    "Node",
    "NodeUnavailableError",
    "PackageError",
    "PackageSpec",
    "RequestRecord",
    "SplitExitError",
    "TensorInfo",
    "TraceError",
    "TrainConfig",
    "TrainReport",
    "UnknownModelError",
    "WireError",
    "build_model",
    "calibrate",
    "evaluate",
    "list_confidences",
    "list_cut_points",
    "list_datasets",
    "list_heads",
    "list_models",
    "load",
    "load_dataset",
    "read_spec",
    "register_confidence",
    "register_head",
    "register_model",
    "save",
    "split_dataset",
    "trace_model",
    "train",
    "tune_cpu",
]


def test_all_is_sorted_and_pinned() -> None:
    assert splitexit.__all__ == sorted(splitexit.__all__)
    assert splitexit.__all__ == EXPECTED
    assert all(hasattr(splitexit, name) for name in splitexit.__all__)


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(splitexit, n) for n in splitexit.__all__ if n.endswith("Error")]
    assert all(issubclass(e, splitexit.SplitExitError) for e in errors)


def test_import_starts_no_threads_and_keeps_thread_settings() -> None:
    code = ("import threading, torch; before = (threading.active_count(), torch.get_num_threads()); "
            "import splitexit; print(before == (threading.active_count(), torch.get_num_threads()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
