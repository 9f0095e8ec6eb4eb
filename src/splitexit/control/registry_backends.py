"""The registry a cluster file's ``registry:`` names: the embedded one, or an etcd."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from splitexit.config import EtcdSpec, EtcdTLS
from splitexit.config.etcd import ClusterTLS
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.etcd_registry import EtcdRegistry
from splitexit.control.registry import Registry
from splitexit.errors import ClusterError

__all__ = ["open_registry"]


def open_registry(spec: Literal["embedded"] | EtcdSpec, *, node: str | None = None,
                  certificates: str | None = None) -> Registry:
    """The registry a cluster file's ``registry:`` names (not started yet), as node ``node`` opens it.

    ``certificates`` is the cluster's ``security.tls``: with ``registry.tls: cluster`` the node talks to etcd
    with its own certificate from there, whose name etcd (run as ``splitexit etcd --cluster``) takes as its user.
    """
    if not isinstance(spec, EtcdSpec):
        return EmbeddedRegistry()
    if isinstance(spec.tls, ClusterTLS):
        spec = spec.for_node(node, certificates)
        if isinstance(spec.tls, EtcdTLS):
            _require_files(spec.tls, node, certificates)
    return EtcdRegistry(spec)


def _require_files(tls: EtcdTLS, node: str | None, certificates: str | None) -> None:
    """Say which of a node's files is missing, and how to make it, before etcd says "handshake failed"."""
    missing = [path for path in (tls.ca, tls.cert, tls.key) if path is not None and not Path(path).is_file()]
    if missing:
        raise ClusterError(f"node {node} has no TLS files for etcd (`registry.tls: cluster`): {', '.join(missing)} "
                           f"missing. Create them with `splitexit certs issue {certificates} {node}` where the CA is, "
                           f"and copy ca.pem, {node}.pem and {node}.key to this machine")
