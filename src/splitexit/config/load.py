"""The one cluster-file loader: validate, make relative paths relative to the file, read the secret files.

Every command that takes `--cluster` reads the file here, so `tls:`, `token_file` and `password_file`
mean the same thing to `up`, `node`, `run`, `profile` and `plan`. A file that names no token uses
``cluster.token`` beside it when that exists (``splitexit up`` writes one), so every process started from
the same file shares the generated token.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from splitexit.config.base import FROM_FILE, describe_validation_error
from splitexit.config.cluster import MIN_TOKEN_LENGTH, ClusterSpec
from splitexit.errors import ClusterError

__all__ = ["DEFAULT_TOKEN_FILE", "default_token_file", "load_cluster", "read_secret", "require_token",
           "resolve_package"]

#: The token a cluster file without `token`/`token_file` uses: this file beside it (made by `splitexit up`).
DEFAULT_TOKEN_FILE = "cluster.token"


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
        # from a file, a duration needs its unit (`latency: 10` is refused): see docs/cluster.md
        cluster = _absolute_paths(ClusterSpec.model_validate(raw, context={FROM_FILE: str(path)}),
                                  path.resolve().parent)
    except yaml.YAMLError as exc:
        raise ClusterError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        raise ClusterError(f"{path}: {describe_validation_error(exc)}") from exc
    return _with_secrets(cluster, path) if read_secrets else cluster


def _absolute_paths(cluster: ClusterSpec, base: Path) -> ClusterSpec:
    """The file's relative paths, made relative to its directory ``base``; the default token file if it exists."""
    security = cluster.security
    token_file = base / security.token_file if security.token_file else None
    default = base / DEFAULT_TOKEN_FILE
    if token_file is None and security.token is None and (default.is_file() or default.is_symlink()):
        token_file = default
    secured = security.model_copy(update={
        "tls": str(base / security.tls) if security.tls else None,
        "token_file": str(token_file) if token_file else None})
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


def default_token_file(cluster_file: Path, cluster: ClusterSpec) -> Path | None:
    """Where a token for ``cluster`` should be generated: beside the file, when the file names none."""
    security = cluster.security
    if security.token is not None or security.token_file is not None:
        return None
    return _token_beside(cluster_file)


def _token_beside(cluster_file: Path) -> Path:
    return cluster_file.resolve().parent / DEFAULT_TOKEN_FILE


def require_token(cluster_file: Path, cluster: ClusterSpec) -> None:
    """Refuse to serve a node without a cluster token: without one, any process that can reach the node's port
    (on loopback: any local user) could assign it stages and read the inputs it is sent."""
    if cluster.security.token is None:
        default = _token_beside(cluster_file)
        raise ClusterError(f"{cluster_file} gives no cluster token, and a node without one would obey any local "
                           f"process. Run `splitexit up --cluster {cluster_file}` (it writes {default} when the file "
                           f"names no token), or `splitexit certs init DIR --cluster {cluster_file}`, or set "
                           "`security: {token_file: PATH}`; copy the token file to every machine of the cluster")


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

