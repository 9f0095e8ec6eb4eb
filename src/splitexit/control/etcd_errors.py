"""What an etcd or gRPC error from ``etcd3aio`` means, and our :class:`~splitexit.errors.RegistryUnavailableError`
for it: the one place the etcd registry's foreign errors are read, each message naming the next step."""

from __future__ import annotations

import grpc
from etcd3aio import EtcdConnectionError, EtcdTransientError, EtcdUnauthenticatedError

from splitexit.config import EtcdSpec, EtcdTLS
from splitexit.errors import RegistryUnavailableError

__all__ = ["FIX_ENDPOINT", "error_detail", "fix_hint", "is_stale_token", "is_unreachable", "translate"]

#: What to do when no etcd answers at the configured endpoints.
FIX_ENDPOINT = ("start one with `splitexit etcd` (see docs/registry.md) or fix `registry.etcd` in the cluster "
                "file")
#: Words in an etcd/gRPC error that point at TLS rather than at a missing server.
TLS_WORDS = ("ssl", "tls", "handshake", "socket closed", "certificate", "verification")
#: What to do when the TLS handshake with etcd failed.
FIX_TLS = ("check `registry.tls` in the cluster file: `ca` must have signed etcd's certificate, which must "
           "name the host in `registry.etcd`, and etcd must trust the client certificate")


def translate(exc: BaseException, spec: EtcdSpec, action: str) -> RegistryUnavailableError:
    """Our error for a foreign one: what failed (``action``), at which endpoint, and what to do."""
    where = ", ".join(spec.etcd)
    detail = error_detail(exc)
    if is_unreachable(exc):
        return RegistryUnavailableError(f"cannot reach etcd at {where} to {action} ({detail}): {fix_hint(detail)}")
    if "authentication failed" in detail:
        return RegistryUnavailableError(f"etcd at {where} rejected user {spec.user!r} ({detail}): "
                                        "check `registry.user` and `password`/`password_file` in the cluster file")
    if "user name is empty" in detail or (not spec.user and "auth" in detail):
        return RegistryUnavailableError(f"etcd at {where} requires a user ({detail}): set `registry.user` "
                                        "and `registry.password_file` in the cluster file")
    if "permission denied" in detail:
        if spec.user is None and isinstance(spec.tls, EtcdTLS) and spec.tls.cert:
            # etcd's user is the client certificate's name; `splitexit etcd --cluster` lets a node write only its
            # own key, and a certificate whose name is no user read nothing
            return RegistryUnavailableError(f"etcd at {where} refused to {action} for the user its client "
                                            f"certificate names ({detail}): a node may write only its own "
                                            f"{spec.prefix}nodes/NAME, and a name etcd has no user for nothing; "
                                            "add the node to the cluster file and restart `splitexit etcd "
                                            "--cluster`, or grant its user a role (docs/registry.md)")
        return RegistryUnavailableError(f"etcd at {where} refused to {action} for user {spec.user!r} "
                                        f"({detail}): grant it readwrite on {spec.prefix}* "
                                        "(`etcdctl role grant-permission ROLE readwrite --prefix ...`)")
    if "lease not found" in detail:
        return RegistryUnavailableError(f"cannot {action}: the lease is gone (it expired or was revoked); "
                                        "grant a new one")
    return RegistryUnavailableError(f"etcd at {where} failed to {action}: {detail}")


def error_detail(exc: BaseException) -> str:
    """The most telling text of a foreign error (a gRPC status's details, not its debug string)."""
    for error in (exc, exc.__cause__):
        if isinstance(error, grpc.aio.AioRpcError):
            return f"{error.code().name}: {error.details()}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def fix_hint(detail: str) -> str:
    """What to do when etcd cannot be reached: fix TLS if the handshake failed, else start or point at one."""
    return FIX_TLS if any(word in detail.lower() for word in TLS_WORDS) else FIX_ENDPOINT


def is_unreachable(exc: BaseException) -> bool:
    """True for errors that may pass by themselves: no connection, no answer in time (also as our cause)."""
    for error in (exc, exc.__cause__):
        if isinstance(error, (EtcdConnectionError, EtcdTransientError, TimeoutError)):
            return True
        if isinstance(error, grpc.aio.AioRpcError) and error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                        grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
    return False


def is_stale_token(exc: BaseException) -> bool:
    """etcd no longer knows our auth token (it restarted, or the token expired)."""
    return isinstance(exc, EtcdUnauthenticatedError) or "invalid auth token" in error_detail(exc)
