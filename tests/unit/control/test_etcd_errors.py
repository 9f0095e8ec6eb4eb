"""etcd's errors read without an etcd: which may pass by themselves, and what each of ours tells the user to do."""

from __future__ import annotations

import grpc
import pytest
from etcd3aio import EtcdConnectionError, EtcdUnauthenticatedError

from splitexit.config import EtcdSpec
from splitexit.control.etcd_errors import FIX_ENDPOINT, error_detail, is_stale_token, is_unreachable, translate
from splitexit.errors import RegistryUnavailableError

SPEC = EtcdSpec(etcd=["10.0.0.5:2379"], user="splitexit", password="pw")


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@pytest.mark.parametrize("exc", [EtcdConnectionError("connection refused"), TimeoutError(),
                                 rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect"),
                                 rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")])
def test_errors_that_may_pass_by_themselves_are_unreachable_and_say_how_to_start_etcd(exc: Exception) -> None:
    assert is_unreachable(exc)
    wrapped = RegistryUnavailableError("ours")
    wrapped.__cause__ = exc
    assert is_unreachable(wrapped), "also as the cause of ours"
    error = translate(exc, SPEC, "read nodes/*")
    assert "cannot reach etcd at 10.0.0.5:2379 to read nodes/*" in str(error) and FIX_ENDPOINT in str(error)


def test_a_failed_tls_handshake_points_at_the_tls_settings() -> None:
    error = translate(rpc_error(grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed"), SPEC, "read nodes/*")
    assert "registry.tls" in str(error) and FIX_ENDPOINT not in str(error)


@pytest.mark.parametrize("details, advice", [
    ("etcdserver: authentication failed, invalid user ID or password", "check `registry.user`"),
    ("etcdserver: permission denied", "grant it readwrite on /splitexit/*"),
    ("etcdserver: requested lease not found", "grant a new one"),
    ("etcdserver: too many requests", "failed to put plan"),
])
def test_each_refusal_names_the_next_step(details: str, advice: str) -> None:
    exc = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, details)
    assert not is_unreachable(exc)
    assert advice in str(translate(exc, SPEC, "put plan"))


def test_a_cluster_without_a_user_is_told_to_set_one() -> None:
    exc = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty")
    assert "set `registry.user`" in str(translate(exc, EtcdSpec(etcd=["10.0.0.5:2379"]), "read plan"))


def test_a_forgotten_token_is_stale_and_the_detail_is_the_status_not_the_debug_string() -> None:
    exc = rpc_error(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
    assert is_stale_token(exc) and is_stale_token(EtcdUnauthenticatedError("expired"))
    assert error_detail(exc) == "UNAUTHENTICATED: etcdserver: invalid auth token"
    assert error_detail(TimeoutError()) == "no answer in time"
    assert not is_stale_token(rpc_error(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"))
