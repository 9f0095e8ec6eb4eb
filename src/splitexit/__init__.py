"""splitexit: early-exit, split-computing inference for any PyTorch model.

The public API is re-exported here and nothing else happens on import: no threads, no environment
changes. ``__all__`` is pinned by a test.
"""

from splitexit.config import (
    ClusterSpec,
    CpuSettings,
    DataSplit,
    ExitPolicy,
    ModelSource,
    PackageSpec,
    TrainConfig,
)
from splitexit.control.edge import Entry, EntryClient
from splitexit.errors import (
    CalibrationError,
    ClusterError,
    ConfigError,
    CutError,
    DataError,
    IntegrityError,
    ModelError,
    NodeUnavailableError,
    PackageError,
    SplitExitError,
    TraceError,
    UnknownModelError,
    WireError,
)
from splitexit.model.calibrate import CalibrationReport, calibrate
from splitexit.model.cpu import tune_cpu
from splitexit.model.data import list_datasets, load_dataset, split_dataset
from splitexit.model.evaluate import EvalReport, evaluate
from splitexit.model.exits import EarlyExitNet, InferenceResult
from splitexit.model.graph import CutPoint, ModelGraph, list_cut_points, trace_model
from splitexit.model.heads import (
    list_confidences,
    list_heads,
    register_confidence,
    register_head,
)
from splitexit.model.package import load, read_spec, save
from splitexit.model.train import TrainReport, train
from splitexit.model.zoo import build_model, list_models, register_model
from splitexit.runtime.node import Node
from splitexit.runtime.records import RequestRecord
from splitexit.tensors import TensorInfo

__version__ = "0.1.0"

__all__ = [
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
