"""``registry.tls: cluster``: each node's own certificate from ``security.tls``, checked when the file loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from splitexit.config import EtcdSpec, EtcdTLS
from splitexit.config.etcd import ClusterTLS
from splitexit.config.load import load_cluster
from splitexit.errors import ClusterError, ConfigError

NODES = """nodes:
  - {name: edge, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
"""


def write(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster.yaml"
    path.write_text(text)
    return path


def test_tls_cluster_resolves_to_the_nodes_own_files_next_to_the_cluster_file(tmp_path: Path) -> None:
    path = write(tmp_path / "conf", NODES + "security: {tls: certs}\n"
                                            "registry: {etcd: [127.0.0.1:2379], tls: cluster}\n")
    cluster = load_cluster(path)
    assert isinstance(cluster.registry, EtcdSpec) and isinstance(cluster.registry.tls, ClusterTLS)
    certs = tmp_path / "conf" / "certs"
    for node in ("edge", "cloud1"):
        spec = cluster.registry.for_node(node, cluster.security.tls)
        assert spec.tls == EtcdTLS(ca=str(certs / "ca.pem"), cert=str(certs / f"{node}.pem"),
                                   key=str(certs / f"{node}.key"))
        assert spec.etcd == cluster.registry.etcd and spec.prefix == cluster.registry.prefix


def test_tls_cluster_is_written_back_as_the_word() -> None:
    spec = EtcdSpec.model_validate({"etcd": "127.0.0.1:2379", "tls": "cluster"})
    assert spec.model_dump(mode="json")["tls"] == "cluster"
    assert EtcdSpec.model_validate(spec.model_dump(mode="json")) == spec
    files = EtcdSpec.model_validate({"etcd": "127.0.0.1:2379", "tls": {"ca": "ca.pem"}})
    assert files.for_node("edge", "certs") is files, "explicit files are used as they are"


def test_tls_cluster_without_security_tls_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, NODES + "registry: {etcd: [127.0.0.1:2379], tls: cluster}\n")
    with pytest.raises(ClusterError, match=r"`registry.tls: cluster` .*`security: \{tls: DIR\}`.*splitexit certs init"):
        load_cluster(path)
    spec = EtcdSpec.model_validate({"etcd": "127.0.0.1:2379", "tls": "cluster"})
    with pytest.raises(ConfigError, match="security.tls"):  # the same, for a spec built in code
        spec.for_node("edge", None)


@pytest.mark.parametrize("tls, message", [
    ("clusters", "either 'cluster'"),
    ({}, "ca"),
    ({"ca": "ca.pem", "cert": "edge.pem"}, "give both `cert` and `key`"),
])
def test_other_tls_values_are_refused_with_their_own_reason(tls: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        EtcdSpec.model_validate({"etcd": "127.0.0.1:2379", "tls": tls})
    assert caught.value.error_count() == 1, "one reason, not one per kind of `tls`"
