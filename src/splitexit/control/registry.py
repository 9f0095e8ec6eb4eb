"""Where nodes announce themselves and the coordinator publishes the plan: a small key-value registry.

Two implementations of one :class:`Registry` protocol:

- :class:`EmbeddedRegistry`: a dict in this process (one machine; tests drive its leases with a fake clock);
- :class:`EtcdRegistry`: a real etcd over ``etcd3aio`` (gRPC asyncio, like our runtime), for clusters.

Keys are relative strings (``nodes/w1``, ``plan``); each registry applies its own prefix. Liveness is a
lease: a key put under a lease disappears when the lease is not refreshed within its TTL, and watchers see
that as a delete. :class:`Registration` keeps one such key alive for as long as its process runs.

A watch delivers the changes made after the last state this registry object saw (for etcd: the revision of
its last read or write), so ``items(prefix)`` followed by ``watch(prefix)`` misses nothing in between.
etcd and gRPC errors stop here and become :class:`~splitexit.errors.RegistryUnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import grpc
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)

from splitexit.config import EtcdSpec
from splitexit.errors import RegistryUnavailableError
from splitexit.wire.messages import RECONNECT_OPTIONS

__all__ = ["EmbeddedRegistry", "EtcdRegistry", "Registration", "Registry", "WatchEvent", "open_registry"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 5.0
SWEEP_INTERVAL = 0.1
#: First retry delay after a failed refresh or a broken watch; doubles up to the cap.
RETRY_DELAY = 0.1
WATCH_RETRY_CAP = 1.0
_FIX_ENDPOINT = ("start one with `splitexit etcd` (see docs/registry.md) or fix `registry.etcd` in the cluster "
                 "file")

T = TypeVar("T")


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix; a lease that expired shows up as a delete."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None


class Registry(Protocol):
    """A key-value store with leases and watches; values are bytes (callers put JSON)."""

    async def start(self) -> None:
        """Connect; RegistryUnavailableError if the registry cannot be reached within a timeout."""

    async def close(self) -> None:
        """Disconnect; every watch ends."""

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        """Set ``key``; under ``lease`` it is deleted when the lease ends (a gone lease is an error)."""

    async def get(self, key: str) -> bytes | None: ...

    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value."""

    async def delete(self, key: str) -> None: ...

    async def grant(self, ttl: float) -> int:
        """A new lease that lives ``ttl`` seconds unless refreshed."""

    async def keep_alive(self, lease: int) -> bool:
        """Refresh ``lease`` once; False if it no longer exists (expired or revoked)."""

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys; a lease that is already gone is fine."""

    def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` after the last state this registry saw; survives registry restarts."""


def open_registry(spec: Literal["embedded"] | EtcdSpec) -> Registry:
    """The registry a cluster file's ``registry:`` names (not started yet)."""
    return EtcdRegistry(spec) if isinstance(spec, EtcdSpec) else EmbeddedRegistry()


# ---------------------------------------------------------------------------------------------- embedded
@dataclass
class _Lease:
    ttl: float
    deadline: float
    keys: set[str]


class EmbeddedRegistry:
    """The registry as a dict in this process, for one machine and for tests.

    Every call first expires the leases whose deadline has passed, so reads agree with ``clock``;
    :meth:`start` also sweeps every 0.1 s so that watchers see expiries without anyone calling.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._data: dict[str, tuple[bytes, int | None]] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1
        self._watchers: list[tuple[str, asyncio.Queue[WatchEvent | None]]] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="registry-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for _, queue in self._watchers:
            queue.put_nowait(None)  # ends the watch

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Expire every lease whose deadline has passed: delete its keys and tell the watchers."""
        now = self._clock()
        for lease in [lid for lid, entry in self._leases.items() if entry.deadline <= now]:
            self._drop_lease(lease)

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        self.sweep()
        if lease is not None and lease not in self._leases:
            raise RegistryUnavailableError(f"cannot put {key}: lease {lease} is gone (it expired or was revoked); "
                                           "grant a new one")
        _, old_lease = self._data.get(key, (b"", None))
        if old_lease is not None and old_lease in self._leases:
            self._leases[old_lease].keys.discard(key)
        if lease is not None:
            self._leases[lease].keys.add(key)
        self._data[key] = (value, lease)
        self._notify(WatchEvent("put", key, value))

    async def get(self, key: str) -> bytes | None:
        self.sweep()
        entry = self._data.get(key)
        return entry[0] if entry else None

    async def items(self, prefix: str) -> dict[str, bytes]:
        self.sweep()
        return {key: value for key, (value, _) in sorted(self._data.items()) if key.startswith(prefix)}

    async def delete(self, key: str) -> None:
        self.sweep()
        self._remove(key)

    async def grant(self, ttl: float) -> int:
        lease, self._next_lease = self._next_lease, self._next_lease + 1
        self._leases[lease] = _Lease(ttl, self._clock() + ttl, set())
        return lease

    async def keep_alive(self, lease: int) -> bool:
        self.sweep()
        entry = self._leases.get(lease)
        if entry is None:
            return False
        entry.deadline = self._clock() + entry.ttl
        return True

    async def revoke(self, lease: int) -> None:
        if lease in self._leases:
            self._drop_lease(lease)

    def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        watcher = (prefix, queue)
        self._watchers.append(watcher)  # now, not at the first __anext__: nothing after this call is missed
        return self._drain(watcher)

    async def _drain(self, watcher: tuple[str, asyncio.Queue[WatchEvent | None]]) -> AsyncIterator[WatchEvent]:
        try:
            while (event := await watcher[1].get()) is not None:
                yield event
        finally:
            self._watchers.remove(watcher)

    def _drop_lease(self, lease: int) -> None:
        for key in sorted(self._leases.pop(lease).keys):
            self._remove(key)

    def _remove(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            self._notify(WatchEvent("delete", key, None))

    def _notify(self, event: WatchEvent) -> None:
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)


# -------------------------------------------------------------------------------------------------- etcd
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
        targets, server_name = await self._ipv4_targets()
        self._client = Etcd3Client(targets, watch_reconnect_backoff_seconds=RETRY_DELAY,
                                   watch_max_reconnect_backoff_seconds=WATCH_RETRY_CAP,
                                   tls_server_name=server_name if credentials else None, **credentials)
        self._client._manager.grpc_options.extend(RECONNECT_OPTIONS)  # no public hook for channel options
        await self._client.connect()
        deadline = time.monotonic() + self.connect_timeout
        telling: BaseException | None = None  # the last failure that says more than "no answer in time"
        while True:
            try:
                await asyncio.wait_for(self._probe(), max(0.1, deadline - time.monotonic()))
                return
            except Exception as exc:  # noqa: BLE001 - retry what may pass by itself, report the rest
                if not isinstance(exc, asyncio.TimeoutError):
                    telling = exc
                if _unreachable(exc) and time.monotonic() < deadline:
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                await self.close()
                if isinstance(exc, RegistryUnavailableError):
                    raise
                if _unreachable(exc):
                    detail = _detail(telling or exc)
                    raise RegistryUnavailableError(f"cannot reach etcd at {self._where} within "
                                                   f"{self.connect_timeout:g} s ({detail}): {_hint(detail)}") from exc
                raise self._translate(exc, f"read {self.spec.prefix}*") from exc

    async def _probe(self) -> None:
        """One quick attempt (start() retries): log in if we have a user, then read our prefix."""
        client = self._started()
        if self.spec.user:
            response = await client.auth.authenticate(self.spec.user, self._password or "", max_attempts=1)
            client.set_token(response.token)
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
        delay, relogged = RETRY_DELAY, False
        while not self._closed:
            try:
                responses = self._started().watch.watch(key, prefix_range_end(key), start_revision=start)
                async with contextlib.aclosing(responses):  # type: ignore[type-var]
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
                        delay = RETRY_DELAY
            except Exception as exc:  # noqa: BLE001 - the library retries UNAVAILABLE itself; this is the rest
                if self._closed:
                    return
                if not (_unreachable(exc) or _stale_token(exc)):
                    if isinstance(exc, RegistryUnavailableError):
                        raise
                    raise self._translate(exc, f"watch {prefix}") from exc
                logger.warning("watch of %s broke (%s); resuming at revision %d", prefix, _detail(exc), start)
                await asyncio.sleep(delay)
                delay = min(2 * delay, WATCH_RETRY_CAP)
                with contextlib.suppress(RegistryUnavailableError):
                    if _stale_token(exc):
                        await self._relogin()

    async def _after_cancel(self, prefix: str, response: Any, relogged: bool) -> bool:
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
        relogged = False
        wait = RETRY_DELAY
        while True:
            try:
                return await asyncio.wait_for(operation(), max(0.1, deadline - loop.time()))
            except RegistryUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001 - every foreign error is translated here
                if not relogged and self.spec.user and _stale_token(exc):
                    relogged = True
                    await self._relogin()
                    continue
                if not _unreachable(exc) or loop.time() + wait >= deadline:
                    raise self._translate(exc, action) from exc
            await asyncio.sleep(wait)
            wait = min(wait * 2, 1.0)

    async def _relogin(self) -> None:
        client = self._started()
        async with self._login_lock:
            try:
                response = await asyncio.wait_for(
                    client.auth.authenticate(self.spec.user or "", self._password or ""), self.call_timeout)
            except Exception as exc:  # noqa: BLE001
                raise self._translate(exc, "log in") from exc
            client.set_token(response.token)

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
                raise RegistryUnavailableError(f"cannot resolve etcd host {host!r} ({exc}): {_FIX_ENDPOINT}") from exc
            targets.append(f"{found[0][4][0]}:{port}")
        return targets, server_name

    def _translate(self, exc: BaseException, action: str) -> RegistryUnavailableError:
        """Our error for a foreign one: what failed, at which endpoint, and what to do."""
        detail = _detail(exc)
        if _unreachable(exc):
            return RegistryUnavailableError(f"cannot reach etcd at {self._where} to {action} ({detail}): "
                                            f"{_hint(detail)}")
        if "authentication failed" in detail:
            return RegistryUnavailableError(f"etcd at {self._where} rejected user {self.spec.user!r} ({detail}): "
                                            "check `registry.user` and `password`/`password_file` in the cluster file")
        if "user name is empty" in detail or (not self.spec.user and "auth" in detail):
            return RegistryUnavailableError(f"etcd at {self._where} requires a user ({detail}): set `registry.user` "
                                            "and `registry.password_file` in the cluster file")
        if "permission denied" in detail:
            return RegistryUnavailableError(f"etcd at {self._where} refused to {action} for user {self.spec.user!r} "
                                            f"({detail}): grant it readwrite on {self.spec.prefix}* "
                                            "(`etcdctl role grant-permission ROLE readwrite --prefix ...`)")
        if "lease not found" in detail:
            return RegistryUnavailableError(f"cannot {action}: the lease is gone (it expired or was revoked); "
                                            "grant a new one")
        return RegistryUnavailableError(f"etcd at {self._where} failed to {action}: {detail}")

    def _started(self) -> Etcd3Client:
        if self._client is None or self._client.kv is None:
            raise RuntimeError("call `await registry.start()` first (or it was closed)")
        return self._client

    def _key(self, key: str) -> str:
        return self.spec.prefix + key

    def _relative(self, key: bytes) -> str:
        return key.decode()[len(self.spec.prefix):]

    def _seen(self, revision: int) -> None:
        self._revision = max(self._revision, revision)


def _detail(exc: BaseException) -> str:
    """The most telling text of a foreign error (a gRPC status's details, not its debug string)."""
    for error in (exc, exc.__cause__):
        if isinstance(error, grpc.aio.AioRpcError):
            return f"{error.code().name}: {error.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _hint(detail: str) -> str:
    """What to do when etcd cannot be reached: fix TLS if the handshake failed, else start or point at one."""
    if any(word in detail.lower() for word in ("ssl", "tls", "handshake", "socket closed", "certificate", "verification")):
        return ("check `registry.tls` in the cluster file: `ca` must have signed etcd's certificate, which must "
                "name the host in `registry.etcd`, and etcd must trust the client certificate")
    return _FIX_ENDPOINT


def _unreachable(exc: BaseException) -> bool:
    """True for errors that may pass by themselves: no connection, no answer in time (also as our cause)."""
    for error in (exc, exc.__cause__):
        if isinstance(error, (EtcdConnectionError, EtcdTransientError, asyncio.TimeoutError)):
            return True
        if isinstance(error, grpc.aio.AioRpcError) and error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                        grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
    return False


def _stale_token(exc: BaseException) -> bool:
    """etcd no longer knows our auth token (it restarted, or the token expired)."""
    return isinstance(exc, EtcdUnauthenticatedError) or "invalid auth token" in _detail(exc)


# ------------------------------------------------------------------------------------------ registration
class Registration:
    """Keep ``key`` in ``registry`` while this process runs: put under a lease that a task refreshes.

    The lease is refreshed every ``ttl / 3``. If it was lost (it expired while the registry was
    unreachable, or someone revoked it) the key is put again under a new lease. If the registry cannot be
    reached, that is logged once and retried with back-off; the process keeps serving.
    """

    def __init__(self, registry: Registry, key: str, value: bytes, ttl: float):
        self.registry, self.key, self.value, self.ttl = registry, key, value, ttl
        self.lease: int | None = None
        self._lock = asyncio.Lock()  # one (re-)registration at a time, or a stray lease could own the key
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name=f"registration-{self.key}")

    async def update(self, value: bytes) -> None:
        """Put a new value under the same lease (a new one if it was lost meanwhile).

        Raises RegistryUnavailableError if the registry cannot be reached; the new value is kept and put
        when the background task registers again.
        """
        async with self._lock:
            self.value = value
            if self.lease is None or not await self.registry.keep_alive(self.lease):
                await self._register()
            else:
                await self.registry.put(self.key, value, lease=self.lease)

    async def close(self) -> None:
        """Stop refreshing and revoke the lease, so the key goes now rather than after the TTL."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.lease is not None:
            try:
                await self.registry.revoke(self.lease)
            except RegistryUnavailableError as exc:
                logger.info("could not revoke the lease of %s (%s); it expires within %g s", self.key, exc, self.ttl)
            self.lease = None

    async def _register(self) -> None:
        lease = await self.registry.grant(self.ttl)
        await self.registry.put(self.key, self.value, lease=lease)
        self.lease = lease  # only now: a failed put leaves the old (dead) lease, so the next round retries

    async def _refresh(self) -> None:
        delay, failing = self.ttl / 3, False
        while True:
            await asyncio.sleep(delay)
            try:
                async with self._lock:
                    if self.lease is None or not await self.registry.keep_alive(self.lease):
                        logger.warning("the lease of %s was lost; registering it again", self.key)
                        await self._register()
            except RegistryUnavailableError as exc:
                if failing:
                    delay = min(2 * delay, self.ttl / 3)
                else:
                    logger.warning("cannot refresh %s in the registry, retrying: %s", self.key, exc)
                    failing, delay = True, RETRY_DELAY
                continue
            if failing:
                logger.info("refreshed %s in the registry again", self.key)
            failing, delay = False, self.ttl / 3
