"""A real etcd as the registry (``registry: {etcd: ...}`` in a cluster file): endpoints, TLS, credentials."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Discriminator, Field, Tag, field_serializer, field_validator, model_validator

from splitexit.config.base import SpecModel
from splitexit.errors import ConfigError
from splitexit.units import parse_duration

#: Key prefix under which a cluster keeps its entries in etcd.
DEFAULT_ETCD_PREFIX = "/splitexit/"
#: Lease TTL of node registrations: a node that dies is noticed within about this long (etcd's minimum is 2 s).
DEFAULT_REGISTRATION_TTL = 3.0
_HOST_PORT = re.compile(r"^([A-Za-z0-9_.-]+):([0-9]{1,5})$")


class EtcdTLS(SpecModel):
    """Files for talking TLS to etcd (relative to the cluster file)."""

    ca: str = Field(description="CA certificate that signed etcd's server certificate")
    cert: str | None = Field(None, description="client certificate, for an etcd started with --client-cert-auth")
    key: str | None = Field(None, description="the client certificate's private key")

    @model_validator(mode="after")
    def _cert_with_key(self) -> EtcdTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both `cert` and `key` (a client certificate needs its key), or neither")
        return self


#: ``registry.tls: cluster``: every process talks to etcd with its own node certificate from ``security.tls``.
CLUSTER_TLS = "cluster"
#: The CA certificate's file in ``security.tls`` (as ``runtime/security.py`` writes it).
_CA_FILE = "ca.pem"


class ClusterTLS(SpecModel):
    """``tls: cluster``: the CA is ``<security.tls>/ca.pem``; the client certificate is the process's own node
    certificate, ``<security.tls>/<node>.pem`` and ``.key`` (the node name is etcd's user, when etcd runs as
    ``splitexit etcd --cluster`` does). Resolved by :meth:`EtcdSpec.for_node` where the registry is opened.

    A model without fields rather than a bare string, so that code that handles ``tls`` as a model (the loader,
    making its paths absolute) passes it through unchanged; YAML and ``model_dump`` spell it ``cluster``.
    """

    @model_validator(mode="before")
    @classmethod
    def _only_the_word(cls, value: object) -> object:
        if isinstance(value, ClusterTLS):
            return value
        if value == CLUSTER_TLS:
            return {}
        raise ValueError(f"`tls` is either {CLUSTER_TLS!r} or {{ca, cert, key}}, got {value!r}")


def _tls_kind(value: object) -> str:
    """Which kind of ``tls`` a value is, so that a wrong ``{ca, cert, key}`` reports only its own errors."""
    return CLUSTER_TLS if value == CLUSTER_TLS or isinstance(value, ClusterTLS) else "files"


#: ``tls:`` of an etcd registry: the files, or ``cluster``.
EtcdTLSChoice = Annotated[Annotated[EtcdTLS, Tag("files")] | Annotated[ClusterTLS, Tag(CLUSTER_TLS)],
                          Discriminator(_tls_kind)]


class EtcdSpec(SpecModel):
    """A real etcd as the registry: ``registry: {etcd: [10.0.0.5:2379, 10.0.0.6:2379]}``."""

    etcd: tuple[str, ...] = Field(min_length=1, description="endpoints as host:port; calls are spread over all of them")
    prefix: str = Field(DEFAULT_ETCD_PREFIX, min_length=1, description="key prefix of this cluster's entries")
    ttl: float = Field(DEFAULT_REGISTRATION_TTL, ge=2, description="lease TTL of node registrations, seconds")
    tls: EtcdTLSChoice | None = Field(None, description="{ca, cert, key} files, or `cluster`: each node's own "
                                                               "certificate from `security.tls`")
    user: str | None = Field(None, min_length=1, description="etcd user, when etcd has auth enabled")
    password: str | None = None
    password_file: str | None = Field(None, description="file holding the password (kept out of the cluster file)")

    @field_validator("etcd", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("etcd")
    @classmethod
    def _host_port(cls, endpoints: tuple[str, ...]) -> tuple[str, ...]:
        for endpoint in endpoints:
            match = _HOST_PORT.match(endpoint)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"etcd endpoint {endpoint!r} must be host:port, like 127.0.0.1:2379 "
                                 "(no http://; set `tls` for https)")
        return endpoints

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, value: str | float) -> float:
        """etcd counts lease TTLs in whole seconds, so here a bare number is seconds even in a file (``3s`` too)."""
        return parse_duration(value)

    @field_validator("prefix")
    @classmethod
    def _ends_with_slash(cls, prefix: str) -> str:
        return prefix if prefix.endswith("/") else prefix + "/"

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_word(cls, value: object) -> object:
        """A string must be ``cluster`` (said once here, rather than once per kind of ``tls``)."""
        if isinstance(value, str) and value != CLUSTER_TLS:
            raise ValueError(f"`tls` is either {CLUSTER_TLS!r} (each node's certificate from `security.tls`) or "
                             f"{{ca: FILE, cert: FILE, key: FILE}}, got {value!r}")
        return value

    @field_serializer("tls")
    def _tls_out(self, tls: EtcdTLS | ClusterTLS | None) -> object:
        return CLUSTER_TLS if isinstance(tls, ClusterTLS) else tls

    def for_node(self, node: str | None, certificates: str | None) -> EtcdSpec:
        """This spec as node ``node`` uses it: ``tls: cluster`` becomes the CA and ``node``'s certificate and key
        in ``certificates`` (the cluster's ``security.tls``); any other spec is returned as it is."""
        if not isinstance(self.tls, ClusterTLS):
            return self
        if certificates is None:
            raise ConfigError("`registry.tls: cluster` takes etcd's client certificates from `security.tls`, which "
                              "the cluster file does not set: add `security: {tls: DIR}` (`splitexit certs init DIR`)")
        if node is None:
            raise ConfigError("`registry.tls: cluster` needs the name of the node that opens the registry")
        directory = Path(certificates)
        files = EtcdTLS(ca=str(directory / _CA_FILE), cert=str(directory / f"{node}.pem"),
                        key=str(directory / f"{node}.key"))
        return self.model_copy(update={"tls": files})

    @model_validator(mode="after")
    def _credentials(self) -> EtcdSpec:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give `password` or `password_file`, not both")
        if self.user is None and (self.password is not None or self.password_file is not None):
            raise ValueError("a password needs a `user`")
        if self.user is not None and self.password is None and self.password_file is None:
            raise ValueError(f"user {self.user!r} needs a `password` or `password_file`")
        return self


