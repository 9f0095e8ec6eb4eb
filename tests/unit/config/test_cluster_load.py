"""The one cluster-file loader: relative paths mean "next to the file", secrets are read, problems are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitexit.app.run import ensure_cluster_token
from splitexit.config import EtcdSpec
from splitexit.config.load import DEFAULT_TOKEN_FILE, default_token_file, load_cluster, require_token, resolve_package
from splitexit.errors import ClusterError

TOKEN = "a-token-of-32-characters-exactly"
NODES = """nodes:
  - {name: edge, role: edge}
  - {name: cloud, address: "127.0.0.1:50061"}
"""


def write(directory: Path, text: str, name: str = "cluster.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the cluster file's, so a path resolved against it would be wrong."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    return other


def test_relative_tls_and_token_file_are_read_next_to_the_file(tmp_path: Path, elsewhere: Path) -> None:
    conf = tmp_path / "conf"
    write(conf / "secrets", TOKEN + "\n", "token")
    path = write(conf, NODES + "security: {tls: certs, token_file: secrets/token}\n")
    cluster = load_cluster(path)
    assert cluster.security.tls == str(conf.resolve() / "certs")
    assert cluster.security.token == TOKEN  # stripped of its newline
    assert cluster.security.token_file is None  # read once, here; nothing further down opens it


def test_a_relative_cluster_path_resolves_against_the_file_not_the_working_directory(tmp_path: Path,
                                                                                      elsewhere: Path) -> None:
    conf = tmp_path / "conf"
    write(conf, TOKEN, "token")
    write(conf, NODES + "security: {tls: certs, token_file: token}\n")
    cluster = load_cluster(Path("..") / "conf" / "cluster.yaml")
    assert cluster.security.tls == str(conf.resolve() / "certs") and cluster.security.token == TOKEN


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    token = write(tmp_path / "vault", TOKEN, "token")
    path = write(tmp_path / "conf", NODES + f"security: {{tls: {tmp_path / 'pki'}, token_file: {token}}}\n")
    cluster = load_cluster(path)
    assert cluster.security.tls == str(tmp_path / "pki") and cluster.security.token == TOKEN


def test_an_inline_token_and_no_security_pass_through(tmp_path: Path) -> None:
    inline = load_cluster(write(tmp_path, NODES + f"security: {{token: {TOKEN}}}\n"))
    assert inline.security.token == TOKEN and inline.security.tls is None
    plain = load_cluster(write(tmp_path, NODES))
    assert plain.security.token is None and plain.security.tls is None and plain.registry == "embedded"


def test_a_short_token_in_a_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "too-short\n", "token")
    path = write(tmp_path, NODES + "security: {token_file: token}\n")
    with pytest.raises(ClusterError, match="at least 16 characters") as caught:
        load_cluster(path)
    assert str(tmp_path.resolve() / "token") in str(caught.value)


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, NODES + "security: {token_file: nowhere/token}\n")
    with pytest.raises(ClusterError, match="token_file") as caught:
        load_cluster(path)
    message = str(caught.value)
    assert str(tmp_path.resolve() / "nowhere" / "token") in message and "does not exist" in message
    assert str(path) in message


def test_without_reading_secrets_the_files_stay_references_next_to_the_file(tmp_path: Path, elsewhere: Path
                                                                              ) -> None:
    """What `plan --write` writes: the secrets' files, by absolute path, never the secrets themselves."""
    conf = tmp_path / "conf"
    write(conf / "secrets", TOKEN + "\n", "token")
    write(conf / "etcd", "s3cret\n", "password")
    path = write(conf, NODES + "security: {tls: certs, token_file: secrets/token}\n"
                              "registry: {etcd: ['127.0.0.1:2379'], user: splitexit, password_file: etcd/password}\n")
    cluster = load_cluster(path, read_secrets=False)
    assert cluster.security.token is None
    assert cluster.security.token_file == str(conf.resolve() / "secrets" / "token")
    assert cluster.security.tls == str(conf.resolve() / "certs")
    assert isinstance(cluster.registry, EtcdSpec)
    assert cluster.registry.password is None
    assert cluster.registry.password_file == str(conf.resolve() / "etcd" / "password")


def test_registry_password_file_and_tls_resolve_next_to_the_file(tmp_path: Path, elsewhere: Path) -> None:
    conf = tmp_path / "conf"
    write(conf / "etcd", "s3cret\n", "password")
    path = write(conf, NODES + "registry:\n  etcd: ['127.0.0.1:2379']\n  user: splitexit\n"
                              "  password_file: etcd/password\n"
                              "  tls: {ca: etcd/ca.pem, cert: etcd/client.pem, key: etcd/client.key}\n")
    registry = load_cluster(path).registry
    assert isinstance(registry, EtcdSpec)
    assert registry.password == "s3cret" and registry.password_file is None and registry.user == "splitexit"
    base = conf.resolve() / "etcd"
    assert registry.tls is not None
    assert (registry.tls.ca, registry.tls.cert, registry.tls.key) == (
        str(base / "ca.pem"), str(base / "client.pem"), str(base / "client.key"))


def test_registry_tls_without_a_client_certificate(tmp_path: Path) -> None:
    path = write(tmp_path, NODES + "registry: {etcd: ['127.0.0.1:2379'], tls: {ca: ca.pem}}\n")
    registry = load_cluster(path).registry
    assert isinstance(registry, EtcdSpec) and registry.tls is not None
    assert registry.tls.ca == str(tmp_path.resolve() / "ca.pem") and registry.tls.cert is None


def test_a_missing_password_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, NODES + "registry: {etcd: ['127.0.0.1:2379'], user: u, password_file: pw}\n")
    with pytest.raises(ClusterError, match="registry password_file") as caught:
        load_cluster(path)
    assert str(tmp_path.resolve() / "pw") in str(caught.value)


def test_a_missing_cluster_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="does not exist") as caught:
        load_cluster(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(caught.value)


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes: [unclosed\n")
    with pytest.raises(ClusterError, match="is not valid YAML") as caught:
        load_cluster(path)
    assert str(path) in str(caught.value)


def test_invalid_values_are_reported_with_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, NODES + "window: 0\n")
    with pytest.raises(ClusterError, match="window") as caught:
        load_cluster(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_an_empty_file_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="nodes"):
        load_cluster(write(tmp_path, ""))


def test_the_package_is_the_flag_else_the_file_entry_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "conf", NODES + "package: ../pkg\n")
    cluster = load_cluster(path)
    assert resolve_package(path, cluster, Path("/other/pkg")) == Path("/other/pkg")
    assert resolve_package(path, cluster, None) == tmp_path / "conf" / ".." / "pkg"
    absolute = write(tmp_path / "conf", NODES + f"package: {tmp_path / 'abs'}\n", "abs.yaml")
    assert resolve_package(absolute, load_cluster(absolute), None) == tmp_path / "abs"
    bare = write(tmp_path / "conf", NODES, "bare.yaml")
    with pytest.raises(ClusterError, match="names no package"):
        resolve_package(bare, load_cluster(bare), None)


def test_a_file_without_a_token_uses_the_generated_one_beside_it(tmp_path: Path, elsewhere: Path) -> None:
    path = write(tmp_path / "conf", NODES)
    assert load_cluster(path).security.token is None
    assert default_token_file(path, load_cluster(path)) == (tmp_path / "conf" / DEFAULT_TOKEN_FILE)
    with pytest.raises(ClusterError, match="gives no cluster token"):
        require_token(path, load_cluster(path))
    written = ensure_cluster_token(path)
    assert written == tmp_path / "conf" / DEFAULT_TOKEN_FILE
    cluster = load_cluster(path)
    assert cluster.security.token == written.read_text().strip()
    require_token(path, cluster)
    assert ensure_cluster_token(path) is None  # one token per cluster: a second `up` keeps it
    assert load_cluster(path, read_secrets=False).security.token_file == str(written)  # `plan --write` names it


def test_a_file_that_names_its_token_gets_no_generated_one(tmp_path: Path) -> None:
    write(tmp_path, TOKEN, "token")
    path = write(tmp_path, NODES + "security: {token_file: token}\n")
    assert ensure_cluster_token(path) is None
    assert not (tmp_path / DEFAULT_TOKEN_FILE).exists()
    assert load_cluster(path).security.token == TOKEN
