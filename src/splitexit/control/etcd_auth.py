"""etcd secured for one cluster (`splitexit etcd --cluster`): TLS from the cluster CA, a user per node.

Without this, any process that reaches etcd can rewrite ``nodes/cloud1`` or the plan. Here etcd serves TLS
with a certificate from the cluster CA and requires a client certificate from that CA
(``--client-cert-auth``); with auth enabled, etcd takes the certificate's name (CN, the node name that
``splitexit certs issue DIR NAME`` writes) as the user, so no password exists to steal. The edge's user may
read and write the cluster's whole prefix (it publishes the plan); each worker's user may write only its
own ``nodes/NAME`` and read the rest. A certificate whose name etcd has no user for reads nothing.

The administrator is etcd's ``root`` user, which has no password: each start issues a ``root`` certificate
into a private temporary directory, uses it to bring users and roles in line with the cluster file, and
deletes it. This needs the CA key, so the secured etcd runs where the CA is kept. Roles are named
``splitexit-edge`` and ``splitexit-node-NAME``; users holding only such roles whose node left the file are
deleted, so a node taken out of the file loses its access at the next start.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.auth import AuthService, PermissionType

from splitexit.config import DEFAULT_ETCD_PREFIX, ClusterSpec, EtcdSpec
from splitexit.control.etcd_errors import error_detail
from splitexit.control.etcd_server import DevEtcd
from splitexit.control.members import NODES
from splitexit.errors import ClusterError
from splitexit.runtime.security import CA_CERT, CA_KEY, issue_certificate

__all__ = ["EDGE_ROLE", "NODE_ROLE", "ROOT", "SERVER_NAME", "Access", "access_for", "grant_access",
           "server_certificate", "start_secured_etcd"]

#: etcd's server certificate in ``security.tls``: ``etcd@server.pem`` / ``.key``. Node names cannot contain
#: ``@``, so no node's files collide with it and no node's user is named like it.
SERVER_NAME = "etcd@server"
#: etcd's administrator; a node of this name would be etcd's administrator too, so none may have it.
ROOT = "root"
#: Roles this module manages (and deletes when their node leaves the cluster file).
MANAGED = "splitexit-"
EDGE_ROLE = MANAGED + "edge"
NODE_ROLE = MANAGED + "node-{name}"
#: Hosts etcd's certificate always names: the dev etcd listens on loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
#: A server certificate expiring within this long is issued again.
RENEW_BEFORE = datetime.timedelta(days=30)
#: Seconds setting up users and roles may take.
SETUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Access:
    """One etcd user and its role: ``readwrite`` and ``read`` are ``(key, range_end)`` pairs (``b""``: one key)."""

    user: str
    role: str
    readwrite: tuple[tuple[bytes, bytes], ...]
    read: tuple[tuple[bytes, bytes], ...] = ()

    def permissions(self) -> set[tuple[int, bytes, bytes]]:
        return ({(PermissionType.READWRITE, k, e) for k, e in self.readwrite}
                | {(PermissionType.READ, k, e) for k, e in self.read})


def access_for(cluster: ClusterSpec) -> list[Access]:
    """The users a cluster needs: each edge reads and writes its whole prefix, each worker writes its own key."""
    prefix = _prefix(cluster)
    if ROOT in (node.name for node in cluster.nodes):
        raise ClusterError(f"a node named {ROOT!r} would be etcd's administrator (etcd takes a certificate's name as "
                           "its user): rename it in the cluster file and issue its certificate again")
    whole = (prefix.encode(), prefix_range_end(prefix.encode()))
    accesses = [Access(edge.name, EDGE_ROLE, readwrite=(whole,)) for edge in cluster.edges]
    for node in cluster.workers:
        own = ((prefix + NODES + node.name).encode(), b"")
        accesses.append(Access(node.name, NODE_ROLE.format(name=node.name), readwrite=(own,), read=(whole,)))
    return accesses


def start_secured_etcd(cluster: ClusterSpec, data_dir: Path | None = None, *, port: int | None = None,
                       peer_port: int | None = None) -> DevEtcd:
    """Start a :class:`DevEtcd` with TLS from the cluster CA and auth with a user per node; the caller stops it."""
    directory = _certificates(cluster)
    access_for(cluster)  # refuse a cluster it cannot secure before anything is started or written
    ca, cert, key = server_certificate(cluster)
    server = DevEtcd(data_dir, port=port, peer_port=peer_port, tls=(ca, cert, key), peer_cn=SERVER_NAME).start()
    try:
        grant_access(cluster, server.endpoint, directory)
    except ClusterError as exc:
        server.stop()
        raise ClusterError(f"{exc}; etcd's log ends with:\n{server.log_tail()}") from exc
    except BaseException:
        server.stop()
        raise
    return server


def server_certificate(cluster: ClusterSpec) -> tuple[Path, Path, Path]:
    """etcd's CA, certificate and key in ``security.tls``: issued now unless one from this CA, naming every host
    of ``registry.etcd`` and not about to expire, is there already."""
    directory = _certificates(cluster)
    hosts = list(LOOPBACK_HOSTS)
    if isinstance(cluster.registry, EtcdSpec):
        hosts += [endpoint.rpartition(":")[0] for endpoint in cluster.registry.etcd]
    hosts = list(dict.fromkeys(hosts))
    ca, cert, key = directory / CA_CERT, directory / f"{SERVER_NAME}.pem", directory / f"{SERVER_NAME}.key"
    if not (cert.is_file() and key.is_file() and _still_good(cert, ca, hosts)):
        issue_certificate(directory, SERVER_NAME, hosts=tuple(hosts))
    return ca, cert, key


def grant_access(cluster: ClusterSpec, endpoint: str, directory: Path) -> None:
    """Bring etcd's users and roles in line with ``cluster`` and enable auth, as ``root`` (see the module doc)."""
    accesses = access_for(cluster)
    with _root_certificate(directory) as (cert, key):
        ca = (directory / CA_CERT).read_bytes()
        try:
            asyncio.run(asyncio.wait_for(_apply(endpoint, ca, cert, key, accesses), SETUP_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - every failure is one message for the user
            raise ClusterError(f"could not set up etcd's users and roles at {endpoint} as {ROOT!r} "
                               f"({error_detail(exc)})") from exc


async def _apply(endpoint: str, ca: bytes, cert: bytes, key: bytes, accesses: list[Access]) -> None:
    client = Etcd3Client([endpoint], ca_cert=ca, cert_chain=cert, cert_key=key, rpc_max_attempts=1)
    await client.connect()
    try:
        auth = client.auth
        assert auth is not None  # connect() made it
        users, roles = set((await auth.user_list()).users), set((await auth.role_list()).roles)
        if ROOT not in users:
            await auth.user_add(ROOT, no_password=True)
        if ROOT not in roles:
            await auth.role_add(ROOT)
        await auth.user_grant_role(ROOT, ROOT)  # etcd ignores a role granted twice
        for access in accesses:
            await _reconcile(auth, access, users, roles)
        await _forget_departed(auth, accesses, users, roles)
        if not (await auth.auth_status()).enabled:
            await auth.auth_enable()
    finally:
        await client.close()


async def _reconcile(auth: AuthService, access: Access, users: set[str], roles: set[str]) -> None:
    """One user with exactly its role, and the role with exactly its permissions."""
    if access.user not in users:
        await auth.user_add(access.user, no_password=True)
    if access.role not in roles:
        await auth.role_add(access.role)
    have = {(int(p.permType), bytes(p.key), bytes(p.range_end)) for p in (await auth.role_get(access.role)).perm}
    want = access.permissions()
    for _, start, end in have - want:
        await auth.role_revoke_permission(access.role, start, end or None)
    for kind, start, end in want - have:
        await auth.role_grant_permission(access.role, start, end or None, perm_type=PermissionType(kind))
    held = set((await auth.user_get(access.user)).roles)
    for role in held - {access.role}:
        if role.startswith(MANAGED):
            await auth.user_revoke_role(access.user, role)
    if access.role not in held:
        await auth.user_grant_role(access.user, access.role)


async def _forget_departed(auth: AuthService, accesses: list[Access], users: set[str], roles: set[str]) -> None:
    """Delete the users and roles of nodes the cluster file no longer names (only ones this module made)."""
    for user in users - {a.user for a in accesses} - {ROOT}:
        held = (await auth.user_get(user)).roles
        if held and all(role.startswith(MANAGED) for role in held):
            await auth.user_delete(user)
    for role in roles - {a.role for a in accesses}:
        if role.startswith(MANAGED):
            await auth.role_delete(role)


def _certificates(cluster: ClusterSpec) -> Path:
    """The cluster's ``security.tls``, which must hold the CA and its key."""
    if not cluster.security.tls:
        raise ClusterError("a secured etcd uses the cluster CA, and the cluster file sets no `security.tls`: create "
                           "one with `splitexit certs init DIR` and add `security: {tls: DIR}` to the file")
    directory = Path(cluster.security.tls)
    if not (directory / CA_CERT).is_file():
        raise ClusterError(f"no cluster CA in {directory}: create one with `splitexit certs init {directory}` and a "
                           f"certificate per node with `splitexit certs issue {directory} NAME`")
    if not (directory / CA_KEY).is_file():
        raise ClusterError(f"{directory / CA_KEY} is missing: a secured etcd issues its own certificate and its "
                           "administrator's with the cluster CA, so run `splitexit etcd --cluster` on the machine "
                           "that keeps the CA key")
    return directory


@contextmanager
def _root_certificate(directory: Path) -> Iterator[tuple[bytes, bytes]]:
    """A certificate for etcd's ``root``, issued into a private temporary directory that is deleted afterwards
    (``issue_certificate`` reads the CA beside what it writes, hence the links)."""
    scratch = Path(tempfile.mkdtemp(prefix="splitexit-etcd-root-"))  # mode 0700
    try:
        for name in (CA_CERT, CA_KEY):
            os.symlink((directory / name).resolve(), scratch / name)
        cert, key = issue_certificate(scratch, ROOT)
        yield cert.read_bytes(), key.read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _still_good(cert_path: Path, ca_path: Path, hosts: list[str]) -> bool:
    """A server certificate signed by this CA, naming every host, valid for more than ``RENEW_BEFORE``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_path.read_bytes()))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    named = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))
    wanted = {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts}
    return wanted <= named and cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _prefix(cluster: ClusterSpec) -> str:
    return cluster.registry.prefix if isinstance(cluster.registry, EtcdSpec) else DEFAULT_ETCD_PREFIX
