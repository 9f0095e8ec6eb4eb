"""The registry a cluster file's ``registry:`` names: the embedded one, or an etcd."""

from __future__ import annotations

from typing import Literal

from splitexit.config import EtcdSpec
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.etcd_registry import EtcdRegistry
from splitexit.control.registry import Registry

__all__ = ["open_registry"]


def open_registry(spec: Literal["embedded"] | EtcdSpec) -> Registry:
    """The registry a cluster file's ``registry:`` names (not started yet)."""
    return EtcdRegistry(spec) if isinstance(spec, EtcdSpec) else EmbeddedRegistry()
