"""The registry on a real etcd, over ``etcd3aio`` (gRPC asyncio, like our runtime), for clusters.

etcd and gRPC errors stop here and become :class:`~splitexit.errors.RegistryUnavailableError`; what each
one means is ``etcd_errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from ipaddress import ip_address
from pathlib import Path
from typing import NamedTuple, TypeVar, cast

import grpc
from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchResponse, WatchService

from splitexit.config import EtcdSpec
from splitexit.config.etcd import ClusterTLS
from splitexit.control.etcd_errors import (
    FIX_ENDPOINT,
    error_detail,
    fix_hint,
    is_stale_token,
    is_unreachable,
    translate,
)
from splitexit.control.registry import WatchEvent
from splitexit.errors import RegistryUnavailableError
from splitexit.runtime.failover import Backoff
from splitexit.wire.grpc_options import RECONNECT_OPTIONS

__all__ = ["EtcdRegistry"]

logger = logging.getLogger(__name__)

#: Seconds :meth:`EtcdRegistry.start` keeps trying to reach etcd, polling every ``START_POLL`` s.
CONNECT_TIMEOUT = 5.0
START_POLL = 0.1
#: Seconds one call keeps retrying while etcd is unreachable (a restart takes about a second) ...
CALL_TIMEOUT = 5.0
#: ... waiting this long between attempts.
CALL_RETRY = Backoff(first=0.1, cap=1.0)
#: Waits before resuming a broken watch (ours, and etcd3aio's own for the streams it reopens).
WATCH_RETRY = Backoff(first=0.1, cap=1.0)
#: The shortest wait for an answer, however close the deadline.
MIN_WAIT = 0.1

T = TypeVar("T")


class _Services(NamedTuple):
    """The connected client and its services, each checked once to be there."""

    client: Etcd3Client
    kv: KVService
    lease: LeaseService
    watch: WatchService
    auth: AuthService


class EtcdRegistry:
    """The registry in a real etcd, shared by every node of a cluster.

    Calls are spread over all endpoints (gRPC round-robin; an endpoint that is down is skipped). A call
    that fails because etcd forgot our auth token (it does on restart, and tokens expire) logs in again
    and retries once. Watches reconnect by themselves and resume from the last revision they delivered.
    """

    def __init__(self, spec: EtcdSpec, *, connect_timeout: float = CONNECT_TIMEOUT,
                 call_timeout: float = CALL_TIMEOUT):
        self.spec = spec
        self.connect_timeout, self.call_timeout = connect_timeout, call_timeout
        self._client: Etcd3Client | None = None
        self._revision = 0  # highest revision any response showed us
        self._password: str | None = None
        self._login_lock = asyncio.Lock()
        self._closed = False

    @property
    def _where(self) -> str:
        return ", ".join(self.spec.etcd)

    async def start(self) -> None:
        """Connect and check that we may read our prefix; retry for ``connect_timeout`` s while etcd is down."""
        credentials = self._tls_files()
        self._password = self._read_password() if self.spec.user else None
        if "cert_chain" not in credentials and not self.spec.user:
            logger.warning("connecting to etcd at %s without a client certificate or user: any process that reaches "
                           "it can rewrite this cluster's registrations and plan. Secure it: `splitexit etcd --cluster "
                           "FILE` and `registry: {etcd: [...], tls: cluster}` (docs/registry.md)", self._where)
        targets, server_name = await self._ipv4_targets()
        self._client = Etcd3Client(targets, watch_reconnect_backoff_seconds=WATCH_RETRY.first,
                                   watch_max_reconnect_backoff_seconds=WATCH_RETRY.cap,
                                   tls_server_name=server_name if credentials else None,
                                   ca_cert=credentials.get("ca_cert"), cert_chain=credentials.get("cert_chain"),
                                   cert_key=credentials.get("cert_key"))
        self._client._manager.grpc_options.extend(RECONNECT_OPTIONS)  # no public hook for channel options
        await self._client.connect()
        deadline = time.monotonic() + self.connect_timeout
        telling: BaseException | None = None  # the last failure that says more than "no answer in time"
        while True:
            try:
                await asyncio.wait_for(self._probe(), max(MIN_WAIT, deadline - time.monotonic()))
                return
            except Exception as exc:  # noqa: BLE001 - retry what may pass by itself, report the rest
                if not isinstance(exc, TimeoutError):
                    telling = exc
                if is_unreachable(exc) and time.monotonic() < deadline:
                    await asyncio.sleep(START_POLL)
                    continue
                await self.close()
                if isinstance(exc, RegistryUnavailableError):
                    raise
                if is_unreachable(exc):
                    detail = error_detail(telling or exc)
                    raise RegistryUnavailableError(
                        f"cannot reach etcd at {self._where} within {self.connect_timeout:g} s ({detail}): "
                        f"{fix_hint(detail)}") from exc
                raise translate(exc, self.spec, f"read {self.spec.prefix}*") from exc

    async def _probe(self) -> None:
        """One quick attempt (start() retries): log in if we have a user, then read our prefix."""
        client = self._started()
        if self.spec.user:
            response = await client.auth.authenticate(self.spec.user, self._password or "", max_attempts=1)
            client.client.set_token(response.token)
        reply = await client.kv.get(self.spec.prefix, limit=1, keys_only=True, max_attempts=1)
        self._seen(reply.header.revision)  # so that a watch has a revision to start from

    async def close(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        response = await self._call(f"put {key}",
                                    lambda: self._started().kv.put(self._key(key), value, lease=lease or 0))
        self._seen(response.header.revision)

    async def get(self, key: str) -> bytes | None:
        response = await self._call(f"read {key}", lambda: self._started().kv.get(self._key(key)))
        self._seen(response.header.revision)
        return bytes(response.kvs[0].value) if response.kvs else None

    async def items(self, prefix: str) -> dict[str, bytes]:
        start = self._key(prefix)
        response = await self._call(f"read {prefix}*",
                                    lambda: self._started().kv.get(start, prefix_range_end(start)))
        self._seen(response.header.revision)
        return {self._relative(kv.key): bytes(kv.value) for kv in response.kvs}

    async def delete(self, key: str) -> None:
        response = await self._call(f"delete {key}", lambda: self._started().kv.delete(self._key(key)))
        self._seen(response.header.revision)

    async def grant(self, ttl: float) -> int:
        # etcd counts whole seconds; it may raise a TTL below its minimum (about 2 s with default settings)
        response = await self._call("grant a lease", lambda: self._started().lease.grant(max(1, math.ceil(ttl))))
        return int(response.ID)

    async def keep_alive(self, lease: int) -> bool:
        async def once() -> bool:
            call = self._started().lease.keep_alive(lease)
            try:
                async for response in call:
                    return response.TTL > 0  # etcd answers TTL 0 for a lease it no longer has
                raise RegistryUnavailableError(f"etcd at {self._where} closed the keep-alive stream of lease {lease}")
            finally:
                call.cancel()
        return await self._call(f"refresh lease {lease}", once)

    async def revoke(self, lease: int) -> None:
        try:
            await self._call(f"revoke lease {lease}", lambda: self._started().lease.revoke(lease))
        except RegistryUnavailableError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.NOT_FOUND):
                raise  # NOT_FOUND: it is gone already, which is what we wanted

    def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        # from the revision after the last one we saw (start() saw one), not from whenever the stream opens
        return self._watch(prefix, self._revision + 1)

    async def _watch(self, prefix: str, start: int) -> AsyncIterator[WatchEvent]:
        key = self._key(prefix)
        failures, relogged = 0, False
        while not self._closed:
            try:
                # an async generator typed as an AsyncIterator: close it when we stop reading
                responses = cast(AsyncGenerator[WatchResponse, None],
                                 self._started().watch.watch(key, prefix_range_end(key), start_revision=start))
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        if response.canceled:
                            relogged = await self._after_cancel(prefix, response, relogged)
                            if response.compact_revision:
                                start = response.compact_revision
                            break
                        relogged = False
                        for event in response.events:
                            start = event.kv.mod_revision + 1
                            deleted = event.type == 1  # mvccpb.Event.DELETE
                            yield WatchEvent("delete" if deleted else "put", self._relative(event.kv.key),
                                             None if deleted else bytes(event.kv.value))
                        failures = 0
            except Exception as exc:  # noqa: BLE001 - the library retries UNAVAILABLE itself; this is the rest
                if self._closed:
                    return
                if not (is_unreachable(exc) or is_stale_token(exc)):
                    if isinstance(exc, RegistryUnavailableError):
                        raise
                    raise translate(exc, self.spec, f"watch {prefix}") from exc
                logger.warning("watch of %s broke (%s); resuming at revision %d", prefix, error_detail(exc), start)
                failures += 1
                await asyncio.sleep(WATCH_RETRY.delay(failures))
                with contextlib.suppress(RegistryUnavailableError):
                    if is_stale_token(exc):
                        await self._relogin()

    async def _after_cancel(self, prefix: str, response: WatchResponse, relogged: bool) -> bool:
        """etcd ended a watch: compaction (resume from the oldest revision left) or a stale token (log in)."""
        reason = response.cancel_reason
        if response.compact_revision:
            logger.error("watch of %s: etcd compacted the history it needed; changes may have been lost", prefix)
            return relogged
        if self.spec.user and not relogged and "permission denied" in reason:
            await self._relogin()  # after an etcd restart the old token is unknown and reads as "no rights"
            return True
        raise RegistryUnavailableError(f"etcd at {self._where} ended the watch of {prefix}: {reason}"
                                       + (f"; grant user {self.spec.user!r} read on {self.spec.prefix}*"
                                          if "permission" in reason else ""))

    # ---- plumbing
    async def _call(self, action: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one etcd call, retrying while etcd is unreachable for up to ``call_timeout`` (a restart takes
        about a second); log in again once if etcd no longer knows our token."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.call_timeout
        relogged, failures = False, 0
        while True:
            try:
                return await asyncio.wait_for(operation(), max(MIN_WAIT, deadline - loop.time()))
            except RegistryUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001 - every foreign error is translated here
                if not relogged and self.spec.user and is_stale_token(exc):
                    relogged = True
                    await self._relogin()
                    continue
                failures += 1
                wait = CALL_RETRY.delay(failures)
                if not is_unreachable(exc) or loop.time() + wait >= deadline:
                    raise translate(exc, self.spec, action) from exc
            await asyncio.sleep(wait)

    async def _relogin(self) -> None:
        client = self._started()
        async with self._login_lock:
            try:
                response = await asyncio.wait_for(
                    client.auth.authenticate(self.spec.user or "", self._password or ""), self.call_timeout)
            except Exception as exc:  # noqa: BLE001 - every foreign error is translated here
                raise translate(exc, self.spec, "log in") from exc
            client.client.set_token(response.token)

    def _read_password(self) -> str:
        if self.spec.password is not None:
            return self.spec.password
        try:
            return Path(self.spec.password_file or "").read_text().strip()
        except OSError as exc:
            raise RegistryUnavailableError(f"cannot read the etcd password_file {self.spec.password_file}: {exc}") \
                from exc

    def _tls_files(self) -> dict[str, bytes]:
        tls = self.spec.tls
        if tls is None:
            return {}
        if isinstance(tls, ClusterTLS):  # a caller's mistake: open_registry resolves it for the node
            raise RegistryUnavailableError("`registry.tls: cluster` names no files until the node is known: open the "
                                           "registry with `open_registry(spec, node=NAME, certificates=DIR)`")
        names = {"ca_cert": tls.ca, "cert_chain": tls.cert, "cert_key": tls.key}
        try:
            return {arg: Path(path).read_bytes() for arg, path in names.items() if path is not None}
        except OSError as exc:
            raise RegistryUnavailableError(f"cannot read an etcd TLS file ({exc}); fix `registry.tls` in the "
                                           "cluster file") from exc

    async def _ipv4_targets(self) -> tuple[list[str], str | None]:
        """The endpoints as IPv4 host:port (etcd3aio dials `ipv4:` targets) and the first host name, if any,
        which TLS then checks etcd's certificate against."""
        loop, targets, server_name = asyncio.get_running_loop(), [], None
        for endpoint in self.spec.etcd:
            host, _, port = endpoint.rpartition(":")
            try:
                ip_address(host)
                targets.append(endpoint)
                continue
            except ValueError:
                server_name = server_name or host
            try:
                found = await loop.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise RegistryUnavailableError(f"cannot resolve etcd host {host!r} ({exc}): {FIX_ENDPOINT}") from exc
            targets.append(f"{found[0][4][0]}:{port}")
        return targets, server_name

    def _started(self) -> _Services:
        """The connected client's services (etcd3aio types them optional until it connects)."""
        client = self._client
        if client is None or client.kv is None or client.lease is None or client.watch is None \
                or client.auth is None:
            raise RuntimeError("call `await registry.start()` first (or it was closed)")
        return _Services(client, client.kv, client.lease, client.watch, client.auth)

    def _key(self, key: str) -> str:
        return self.spec.prefix + key

    def _relative(self, key: bytes) -> str:
        return key.decode()[len(self.spec.prefix):]

    def _seen(self, revision: int) -> None:
        self._revision = max(self._revision, revision)
