"""The one cluster-file loader: validate, make relative paths relative to the file, read the secret files.

Every command that takes `--cluster` reads the file here, so `tls:`, `token_file` and `password_file`
mean the same thing to `up`, `node`, `run`, `profile` and `plan`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from splitexit.config.base import describe_validation_error
from splitexit.config.cluster import ClusterSpec
from splitexit.errors import ClusterError

__all__ = ["load_cluster", "read_secret", "resolve_package"]


def load_cluster(path: Path) -> ClusterSpec:
    """Read and validate a cluster file; every problem is reported with the file's name."""
    if not path.is_file():
        raise ClusterError(f"cluster file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return _resolve_paths(ClusterSpec.model_validate(raw), path)
    except yaml.YAMLError as exc:
        raise ClusterError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise ClusterError(f"{path}: {describe_validation_error(exc)}") from exc


def _resolve_paths(cluster: ClusterSpec, path: Path) -> ClusterSpec:
    """Make the file's relative paths relative to the file, and read the token and etcd password files."""
    security = cluster.security
    base = path.resolve().parent
    tls = str(base / security.tls) if security.tls else None
    token = security.token
    if security.token_file:
        token = read_secret(path, base / security.token_file, "token_file")
        if len(token) < 16:
            raise ClusterError(f"{base / security.token_file}: the token must be at least 16 characters")
    secured = security.model_copy(update={"tls": tls, "token": token, "token_file": None})
    registry = cluster.registry
    if not isinstance(registry, str):  # an EtcdSpec
        etcd_tls = registry.tls and registry.tls.model_copy(
            update={k: str(base / v) for k, v in registry.tls.model_dump().items() if v is not None})
        password = registry.password
        if registry.password_file:
            password = read_secret(path, base / registry.password_file, "registry password_file")
        registry = registry.model_copy(update={"tls": etcd_tls, "password": password, "password_file": None})
    return cluster.model_copy(update={"security": secured, "registry": registry})


def read_secret(cluster_file: Path, secret: Path, what: str) -> str:
    """The stripped contents of a file the cluster file names for a secret."""
    if not secret.is_file():
        raise ClusterError(f"{cluster_file}: {what} {secret} does not exist")
    return secret.read_text().strip()


def resolve_package(cluster_file: Path, cluster: ClusterSpec, package: Path | None) -> Path:
    """The package a cluster serves: the flag wins, else the file's `package:` (relative to the file)."""
    if package is not None:
        return package
    if cluster.package is None:
        raise ClusterError(f"{cluster_file} names no package; add `package: path/to/pkg` to it or name the package: "
                           f"`splitexit run PACKAGE --cluster {cluster_file}`")
    path = Path(cluster.package)
    return path if path.is_absolute() else (cluster_file.parent / path)

