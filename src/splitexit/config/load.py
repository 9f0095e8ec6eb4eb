"""The one cluster-file loader: validate, make relative paths relative to the file, read the secret files.

Every command that takes `--cluster` reads the file here, so `tls:`, `token_file` and `password_file`
mean the same thing to `up`, `node`, `run`, `profile` and `plan`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from splitexit.config.base import describe_validation_error
from splitexit.config.cluster import MIN_TOKEN_LENGTH, ClusterSpec
from splitexit.errors import ClusterError

__all__ = ["load_cluster", "read_secret", "resolve_package"]


def load_cluster(path: Path, *, read_secrets: bool = True) -> ClusterSpec:
    """Read and validate a cluster file; every problem is reported with the file's name.

    Relative paths (``tls``, ``token_file``, the registry's TLS files and ``password_file``) become
    relative to the file. With ``read_secrets`` the token and password files are read into ``token`` and
    ``password``; without, they stay file references, for writing a cluster file that holds no secret.
    """
    if not path.is_file():
        raise ClusterError(f"cluster file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        cluster = _absolute_paths(ClusterSpec.model_validate(raw), path.resolve().parent)
    except yaml.YAMLError as exc:
        raise ClusterError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise ClusterError(f"{path}: {describe_validation_error(exc)}") from exc
    return _with_secrets(cluster, path) if read_secrets else cluster


def _absolute_paths(cluster: ClusterSpec, base: Path) -> ClusterSpec:
    """The file's relative paths, made relative to its directory ``base``."""
    security = cluster.security
    secured = security.model_copy(update={
        "tls": str(base / security.tls) if security.tls else None,
        "token_file": str(base / security.token_file) if security.token_file else None})
    registry = cluster.registry
    if not isinstance(registry, str):  # an EtcdSpec
        etcd_tls = registry.tls and registry.tls.model_copy(
            update={k: str(base / v) for k, v in registry.tls.model_dump().items() if v is not None})
        password_file = str(base / registry.password_file) if registry.password_file else None
        registry = registry.model_copy(update={"tls": etcd_tls, "password_file": password_file})
    return cluster.model_copy(update={"security": secured, "registry": registry})


def _with_secrets(cluster: ClusterSpec, path: Path) -> ClusterSpec:
    """``cluster`` with its token and etcd password files read (``path``: the cluster file, for errors)."""
    security = cluster.security
    if security.token_file:
        token = read_secret(path, Path(security.token_file), "token_file")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ClusterError(f"{security.token_file}: the token must be at least {MIN_TOKEN_LENGTH} characters")
        security = security.model_copy(update={"token": token, "token_file": None})
    registry = cluster.registry
    if not isinstance(registry, str) and registry.password_file:
        password = read_secret(path, Path(registry.password_file), "registry password_file")
        registry = registry.model_copy(update={"password": password, "password_file": None})
    return cluster.model_copy(update={"security": security, "registry": registry})


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

