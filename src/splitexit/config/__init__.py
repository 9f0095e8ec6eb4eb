"""Small typed models, one per concern; YAML files and CLI flags parse into these and nothing else.

`package.py` is a model package's `model.yaml`, `cluster.py` the cluster file (`etcd.py` its etcd
registry), `load.py` the one loader of cluster files. Every model forbids unknown keys, so a typo in a
file is reported instead of silently ignored.
"""

from splitexit.config.base import SpecModel, describe_validation_error
from splitexit.config.cluster import (
    DEFAULT_CODEC,
    DEFAULT_MESSAGE_LIMIT,
    DEFAULT_WINDOW,
    BatchingSpec,
    ClusterSpec,
    LinkChange,
    LinkSpec,
    NodeSpec,
    RetryPolicy,
    SecuritySpec,
)
from splitexit.config.etcd import DEFAULT_ETCD_PREFIX, DEFAULT_REGISTRATION_TTL, EtcdSpec, EtcdTLS
from splitexit.config.metrics import MetricsSpec
from splitexit.config.package import (
    DEFAULT_SPLIT_FRACTIONS,
    DEFAULT_SPLIT_SEED,
    NEVER,
    PACKAGE_FORMAT,
    CpuSettings,
    DataSplit,
    ExitPolicy,
    ExitSpec,
    ImageInput,
    InputSpec,
    ModelSource,
    PackageSpec,
    TrainConfig,
)

__all__ = [
    "DEFAULT_CODEC",
    "DEFAULT_ETCD_PREFIX",
    "DEFAULT_MESSAGE_LIMIT",
    "DEFAULT_REGISTRATION_TTL",
    "DEFAULT_WINDOW",
    "DEFAULT_SPLIT_FRACTIONS",
    "DEFAULT_SPLIT_SEED",
    "NEVER",
    "PACKAGE_FORMAT",
    "BatchingSpec",
    "ClusterSpec",
    "CpuSettings",
    "DataSplit",
    "EtcdSpec",
    "EtcdTLS",
    "ExitPolicy",
    "ExitSpec",
    "ImageInput",
    "InputSpec",
    "LinkChange",
    "LinkSpec",
    "MetricsSpec",
    "ModelSource",
    "NodeSpec",
    "PackageSpec",
    "RetryPolicy",
    "SecuritySpec",
    "SpecModel",
    "TrainConfig",
    "describe_validation_error",
]
