"""One exception tree for everything splitexit raises on purpose.

Every message says what went wrong, where (file, flag, model, node) and what to do next. The CLI turns
any :class:`SplitExitError` into a readable message and exit code 1; anything else is a bug.

    SplitExitError
    ├── ConfigError              a flag, spec string or YAML value is invalid
    ├── DataError                a dataset cannot be found, loaded or split
    ├── ModelError               a model cannot be built or used
    │   ├── UnknownModelError    no model of that name (the message lists the choices)
    │   ├── TraceError           torch.fx and torch.export both failed (names the op and what to try)
    │   └── CutError             a cut point or exit does not exist or cannot carry an exit
    ├── PackageError             a model package is missing, incomplete or does not match its model
    │   └── IntegrityError       a package file was changed after it was written (checksum mismatch)
    ├── CalibrationError         no thresholds meet the requested accuracy drop or compute budget
    ├── WireError                a message from the network is malformed or over a limit (``.code`` says which)
    └── ClusterError             a cluster file, node or connection problem
        ├── NodeUnavailableError a node cannot be reached or stopped answering
        └── RegistryUnavailableError  the registry (etcd) cannot be reached, refused us, or lost a lease
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ClusterError",
    "ConfigError",
    "CutError",
    "DataError",
    "IntegrityError",
    "ModelError",
    "NodeUnavailableError",
    "PackageError",
    "RegistryUnavailableError",
    "SplitExitError",
    "TraceError",
    "UnknownModelError",
    "WireError",
]


class SplitExitError(Exception):
    """Root of every error splitexit raises on purpose; its message is meant for the user."""


class ConfigError(SplitExitError):
    """A flag, spec string or configuration value is invalid."""


class DataError(SplitExitError):
    """A dataset cannot be found, loaded or split."""


class ModelError(SplitExitError):
    """A model cannot be built, traced or cut."""


class UnknownModelError(ModelError):
    """No model is registered, importable or loadable under the given name."""


class TraceError(ModelError):
    """Neither torch.fx nor torch.export could turn the model into a graph."""


class CutError(ModelError):
    """A cut point or exit location does not exist, or cannot carry an exit head."""


class PackageError(SplitExitError):
    """A model package is missing, incomplete, or does not match the model it names."""


class IntegrityError(PackageError):
    """A package file's checksum does not match the one recorded when it was written."""


class CalibrationError(SplitExitError):
    """No thresholds satisfy the requested accuracy drop or compute budget."""


class WireError(SplitExitError):
    """A message from the network is malformed or exceeds a limit; the node answers it and stays up.

    ``code`` is a short machine-readable reason sent back to the peer (``invalid_tensor``, ``too_large``,
    ``unknown_plan``, ``bad_message``).
    """

    def __init__(self, message: str, *, code: str = "bad_message"):
        super().__init__(message)
        self.code = code


class ClusterError(SplitExitError):
    """A cluster file, a node, or a connection between nodes is not usable."""


class NodeUnavailableError(ClusterError):
    """A node cannot be reached, or stopped answering."""


class NodeBusyError(NodeUnavailableError):
    """A node turned a call away for now (e.g. it is storing another edge's stage upload): ask again soon."""


class RegistryUnavailableError(ClusterError):
    """The registry cannot be reached, refused our credentials, or a lease we used no longer exists."""
