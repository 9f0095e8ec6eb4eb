"""Who may talk to a node: a cluster CA, node certificates (mutual TLS), and a shared token.

``splitexit certs init DIR`` makes the cluster CA; ``splitexit certs issue DIR NAME`` makes a key and a
certificate for node NAME, signed by that CA, naming NAME (and any hosts given) as its identity. A node
with ``tls`` in the cluster file serves TLS, requires a client certificate from the same CA, and its
clients check the server's certificate against the CA and the node's name. A ``token`` is checked on
every stream and health call on top, in constant time.

Keys are written with mode 0600; the CA key never needs to leave the machine that issues certificates.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitexit.config import ClusterSpec
from splitexit.errors import ClusterError, ConfigError

__all__ = ["CA_CERT", "CA_KEY", "TOKEN_HEADER", "NodeCredentials", "init_ca", "issue_certificate",
           "node_credentials", "token_matches", "write_token"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
TOKEN_HEADER = "x-splitexit-token"
CA_DAYS = 3650
NODE_DAYS = 825
#: Random bytes in a generated cluster token (written URL-safe base64: 43 characters).
TOKEN_BYTES = 32


def init_ca(directory: Path, *, name: str = "splitexit cluster CA", overwrite: bool = False) -> Path:
    """Create the cluster CA (``ca.pem`` and ``ca.key``) in ``directory``; refuses to replace one."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and not overwrite:
        raise ConfigError(f"{cert_path} already exists; a new CA would invalidate every certificate it signed "
                          "(pass --overwrite if that is what you want)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue_certificate(directory: Path, name: str, *, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Sign a certificate for node ``name`` (also valid for ``hosts``) with the CA in ``directory``."""
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@dataclass(frozen=True)
class NodeCredentials:
    """The CA and one node's certificate and key, read once, turned into gRPC credentials."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path, name: str) -> NodeCredentials:
        paths = [directory / CA_CERT, directory / f"{name}.pem", directory / f"{name}.key"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ClusterError(f"TLS files missing for node {name}: {', '.join(missing)}. Create them with "
                               f"`splitexit certs init {directory}` and `splitexit certs issue {directory} {name}`")
        ca, cert, key = (p.read_bytes() for p in paths)
        return cls(ca, cert, key)

    def server(self) -> grpc.ServerCredentials:
        """Serve TLS and require a client certificate signed by the cluster CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel(self) -> grpc.ChannelCredentials:
        """Present this node's certificate and trust only the cluster CA."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents the cluster token (none without one)."""
    return ((TOKEN_HEADER, token),) if token else ()


def token_matches(metadata: Iterable[tuple[str, str | bytes]] | None, expected: str | None) -> bool:
    """True when no token is configured, or the call carries exactly the expected one (constant time)."""
    if not expected:
        return True
    supplied = dict(metadata or ()).get(TOKEN_HEADER, "")
    return hmac.compare_digest(str(supplied).encode(), expected.encode())


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise ConfigError(f"no cluster CA in {directory}; create one with `splitexit certs init {directory}`")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not a key splitexit wrote")
    return cert, key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), what="key")


def write_token(path: Path) -> Path:
    """Write a new random cluster token to ``path`` (mode 0600) and return the path."""
    _write_private(path, (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode(), what="token file")
    return path


def _write_private(path: Path, data: bytes, *, what: str) -> None:
    """Write a secret: O_NOFOLLOW, so a symlink planted at the path cannot redirect it; fchmod 0600, because an
    existing file keeps its mode under O_CREAT and a secret must never be readable by others."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the {what} {path} ({exc.strerror}); if it is a symlink, remove it") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)


def node_credentials(cluster: ClusterSpec, name: str) -> NodeCredentials | None:
    """This node's TLS identity, when the cluster file asks for TLS."""
    tls = cluster.security.tls
    return NodeCredentials.load(Path(tls), name) if tls else None
