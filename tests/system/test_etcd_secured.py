"""`splitexit etcd --cluster`: each attack on the registry, run against a real secured etcd, now fails.

The etcd is started by ``start_secured_etcd``, the function the CLI calls (one test runs the CLI itself).
Every client is a real ``EtcdRegistry`` with real certificates from ``splitexit certs``' code: a worker's
certificate may write its own ``nodes/NAME`` only (not another node's key, not the plan, not another
node's lease); a client without a certificate, with one from another CA, or with one of the cluster CA
that names no node of the file reads nothing; the edge's certificate writes the plan; and a real cluster
(an edge and a worker process, ``registry: {etcd: [...], tls: cluster}``) serves correctly through it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
import yaml

from splitexit.config import ClusterSpec, EtcdSpec, EtcdTLS
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.etcd_auth import SERVER_NAME, start_secured_etcd
from splitexit.control.etcd_registry import EtcdRegistry
from splitexit.control.etcd_server import DevEtcd
from splitexit.control.local_cluster import LocalCluster
from splitexit.control.members import NODES
from splitexit.control.registry import Registry
from splitexit.control.registry_backends import open_registry
from splitexit.errors import ClusterError, RegistryUnavailableError
from splitexit.runtime.security import init_ca, issue_certificate
from support import digits_net, free_port

TOKEN = "etcd-secured-token-0123456789"
TTL = 30.0  # long: the worker does not re-put its entry while a test runs
INPUTS = 16
#: ``stranger`` has a certificate from the cluster CA but is not in the cluster file.
CERTIFIED = ("edge", "cloud1", "cloud2", "stranger")


def make_pki(root: Path) -> Path:
    pki = root / "pki"
    init_ca(pki)
    for name in CERTIFIED:
        issue_certificate(pki, name)
    return pki


def write_cluster(root: Path, pki: Path, port: int, workers: tuple[str, ...] = ("cloud1", "cloud2")) -> Path:
    (root / "token").write_text(TOKEN + "\n")
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "registry": {"etcd": [f"127.0.0.1:{port}"], "tls": "cluster", "ttl": TTL},
        "nodes": [{"name": "edge", "role": "edge"},
                  *({"name": w, "address": f"127.0.0.1:{free_port()}", "tier": 1} for w in workers)],
        "security": {"tls": str(pki), "token_file": "token"}}))
    return path


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[ClusterSpec, DevEtcd]]:
    """A secured etcd for the cluster edge -> {cloud1, cloud2}, as `splitexit etcd --cluster` starts it."""
    port = free_port()
    cluster = load_cluster(write_cluster(tmp_path, make_pki(tmp_path), port))
    server = start_secured_etcd(cluster, tmp_path / "etcd", port=port)
    try:
        yield cluster, server
    finally:
        server.stop()


async def as_node(cluster: ClusterSpec, name: str) -> Registry:
    """The registry as node ``name`` opens it: its own certificate from `security.tls` (`tls: cluster`)."""
    registry = open_registry(cluster.registry, node=name, certificates=cluster.security.tls)
    await registry.start()
    return registry


def refused(action: str) -> AbstractContextManager[object]:
    """etcd said no: permission denied, for the named action."""
    return pytest.raises(RegistryUnavailableError, match=f"refused to {action} .*permission denied")


def test_a_worker_writes_its_own_key_and_nothing_else_and_the_edge_writes_the_plan(
        secured: tuple[ClusterSpec, DevEtcd]) -> None:
    cluster, _ = secured

    async def main() -> None:
        edge, cloud1, cloud2 = [await as_node(cluster, n) for n in ("edge", "cloud1", "cloud2")]
        lease1 = await cloud1.grant(TTL)  # leases need no key permission
        await cloud1.put(NODES + "cloud1", b"cloud1", lease=lease1)
        assert await cloud1.keep_alive(lease1)
        lease2 = await cloud2.grant(TTL)
        await cloud2.put(NODES + "cloud2", b"cloud2", lease=lease2)
        await edge.put("plan", b"{}")  # (c) the edge publishes the plan

        with refused("put nodes/cloud2"):  # (a) hijack another node's registration
            await cloud1.put(NODES + "cloud2", b"forged")
        with refused("put nodes/evil"):  # ... or add a replica the file does not name
            await cloud1.put(NODES + "evil", b"forged")
        with refused("put plan"):  # ... or publish a plan
            await cloud1.put("plan", b"forged")
        with refused("delete nodes/cloud2"):  # ... or deregister another node
            await cloud1.delete(NODES + "cloud2")
        with refused("delete plan"):
            await cloud1.delete("plan")
        with refused(f"revoke lease {lease2}"):  # ... or end its lease, which deletes its key
            await cloud1.revoke(lease2)
        with refused("put nodes/cloud1"):  # ... or attach its key to a lease that holds another node's
            await cloud1.put(NODES + "cloud1", b"cloud1", lease=lease2)

        assert await cloud1.items("") == {NODES + "cloud1": b"cloud1", NODES + "cloud2": b"cloud2", "plan": b"{}"}
        assert await edge.items(NODES) == {NODES + "cloud1": b"cloud1", NODES + "cloud2": b"cloud2"}
        await cloud1.revoke(lease1)  # its own lease: fine, and its key goes with it
        assert await edge.get(NODES + "cloud1") is None
        await edge.put(NODES + "evil", b"edge may")  # the edge's role covers the whole prefix
        for registry in (edge, cloud1, cloud2):
            await registry.close()

    asyncio.run(main())


def test_clients_without_a_node_certificate_read_nothing(secured: tuple[ClusterSpec, DevEtcd], tmp_path: Path
                                                          ) -> None:
    cluster, server = secured
    assert isinstance(cluster.registry, EtcdSpec) and cluster.security.tls
    pki = Path(cluster.security.tls)
    other = tmp_path / "other-ca"
    init_ca(other)
    issue_certificate(other, "cloud1")  # the right name from the wrong CA
    attackers = {
        "no certificate": EtcdTLS(ca=str(pki / "ca.pem")),
        "plain text": None,
        "another CA": EtcdTLS(ca=str(pki / "ca.pem"), cert=str(other / "cloud1.pem"), key=str(other / "cloud1.key")),
    }

    async def main() -> None:
        for tls in attackers.values():  # (b) the handshake fails: nothing is read
            spec = EtcdSpec(etcd=[server.endpoint], tls=tls)
            with pytest.raises(RegistryUnavailableError, match="registry.tls"):
                await EtcdRegistry(spec, connect_timeout=0.5).start()
        # the cluster CA's certificate for a name the file does not list: etcd has no such user
        with pytest.raises(RegistryUnavailableError, match=r"refused to read /splitexit/\* .*permission denied"):
            await as_node(cluster, "stranger")

    asyncio.run(main())


def test_the_secured_etcd_refuses_what_it_cannot_secure(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    cluster = load_cluster(write_cluster(tmp_path, pki, free_port()))
    rooted = cluster.model_copy(update={"nodes": (*cluster.nodes, cluster.nodes[1].model_copy(
        update={"name": "root"}))})
    with pytest.raises(ClusterError, match="a node named 'root' would be etcd's administrator"):
        start_secured_etcd(rooted, tmp_path / "etcd")
    without = cluster.model_copy(update={"security": cluster.security.model_copy(update={"tls": None})})
    with pytest.raises(ClusterError, match=r"sets no `security.tls`.*splitexit certs init"):
        start_secured_etcd(without, tmp_path / "etcd")
    (pki / "ca.key").unlink()  # a machine that has only the CA certificate
    with pytest.raises(ClusterError, match="ca.key is missing.*on the machine that keeps the CA key"):
        start_secured_etcd(cluster, tmp_path / "etcd")
    assert not (pki / f"{SERVER_NAME}.pem").exists() and not (tmp_path / "etcd").exists(), "nothing started"


def test_a_node_without_its_files_is_told_how_to_make_them(tmp_path: Path) -> None:
    cluster = load_cluster(write_cluster(tmp_path, make_pki(tmp_path), free_port(), workers=("cloud3",)))
    with pytest.raises(ClusterError, match=r"node cloud3 has no TLS files .*cloud3.pem.*splitexit certs issue"):
        open_registry(cluster.registry, node="cloud3", certificates=cluster.security.tls)


def test_an_open_etcd_client_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main(server: DevEtcd) -> None:
        registry = EtcdRegistry(EtcdSpec(etcd=[server.endpoint]))
        await registry.start()
        await registry.put("k", b"v")
        await registry.close()

    with DevEtcd(port=free_port()) as server, caplog.at_level(logging.WARNING):
        asyncio.run(main(server))
    warnings = [r.getMessage() for r in caplog.records if "without a client certificate or user" in r.getMessage()]
    assert len(warnings) == 1 and "splitexit etcd --cluster" in warnings[0]


@pytest.mark.slow
def test_restarts_keep_access_and_a_node_taken_out_of_the_file_loses_it(tmp_path: Path) -> None:
    pki, port = make_pki(tmp_path), free_port()
    data = tmp_path / "etcd"

    async def writes(cluster: ClusterSpec, name: str) -> None:
        registry = await as_node(cluster, name)
        await registry.put(NODES + name, name.encode())
        await registry.close()

    cluster = load_cluster(write_cluster(tmp_path, pki, port))
    with_both = start_secured_etcd(cluster, data, port=port)
    with_both.stop()
    cert = (pki / f"{SERVER_NAME}.pem").read_bytes()
    server = start_secured_etcd(cluster, data, port=port)  # again on the same data: nothing to change
    try:
        assert (pki / f"{SERVER_NAME}.pem").read_bytes() == cert, "a good server certificate is kept"
        asyncio.run(writes(cluster, "cloud2"))
    finally:
        server.stop()
    smaller = load_cluster(write_cluster(tmp_path, pki, port, workers=("cloud1",)))
    server = start_secured_etcd(smaller, data, port=port)
    try:
        asyncio.run(writes(smaller, "cloud1"))
        with pytest.raises(RegistryUnavailableError, match="permission denied"):
            asyncio.run(writes(cluster, "cloud2"))  # its user is gone with it
    finally:
        server.stop()


@pytest.mark.slow
def test_a_cluster_serves_through_the_secured_etcd_and_forgeries_are_refused(secured: tuple[ClusterSpec, DevEtcd],
                                                                             tmp_path: Path) -> None:
    cluster, _ = secured
    assert isinstance(cluster.registry, EtcdSpec) and cluster.security.tls
    serving = tmp_path / "serving"
    serving.mkdir()
    port = int(cluster.registry.etcd[0].rpartition(":")[2])
    cluster_file = write_cluster(serving, Path(cluster.security.tls), port, workers=("cloud1",))
    cluster = load_cluster(cluster_file)  # edge -> cloud1; cloud2 keeps its etcd user and attacks
    net = digits_net(exit_quantile=0.5)
    x = torch.randn(INPUTS, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    expected = net.infer(x).prediction.tolist()

    async def main() -> list[object]:
        entry = Entry(net, cluster)
        await entry.start()  # the edge's own certificate (`tls: cluster`) reads the registrations
        try:
            stranger = open_registry(cluster.registry, node="stranger", certificates=cluster.security.tls)
            with pytest.raises(RegistryUnavailableError, match="permission denied"):
                await stranger.start()
            cloud2 = await as_node(cluster, "cloud2")  # a worker of the file, attacking another's entry
            with refused("put nodes/cloud1"):
                await cloud2.put(NODES + "cloud1", b'{"address": "127.0.0.1:1"}')
            await cloud2.close()
            records = [await entry.infer(sample, index=i) for i, sample in enumerate(x)]
        finally:
            await entry.close()
        return [(r.error, r.prediction, r.node) for r in records]

    with LocalCluster(cluster_file, cluster, log_dir=tmp_path, cache_root=tmp_path / "stages"):
        results = asyncio.run(main())
    assert [error for error, _, _ in results] == [None] * INPUTS
    assert [prediction for _, prediction, _ in results] == expected
    assert "cloud1" in {node for _, _, node in results}, "the worker registered itself and served"


@pytest.mark.slow
def test_the_cli_starts_it_secured_and_warns_without_a_cluster(tmp_path: Path) -> None:
    pki, port = make_pki(tmp_path), _port_pair()
    cluster_file = write_cluster(tmp_path, pki, port)
    process = subprocess.Popen([sys.executable, "-m", "splitexit", "etcd", "--cluster", str(cluster_file),
                                "--data-dir", str(tmp_path / "etcd"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]  # type: ignore[union-attr]
        assert f"etcd ready at 127.0.0.1:{port} (TLS and a user per node" in lines[0], lines
        assert f"registry: {{etcd: [127.0.0.1:{port}], tls: cluster}}" in lines[1]
        cluster = load_cluster(cluster_file)

        async def use() -> None:
            cloud1 = await as_node(cluster, "cloud1")
            await cloud1.put(NODES + "cloud1", b"1")
            with refused("put plan"):
                await cloud1.put("plan", b"{}")
            await cloud1.close()
        asyncio.run(use())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert "etcd stopped" in process.stdout.read()  # type: ignore[union-attr]
        assert "warning" not in process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)

    unsecured = subprocess.Popen([sys.executable, "-m", "splitexit", "etcd", "--data-dir", str(tmp_path / "open"),
                                  "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "registry: {etcd: [" in unsecured.stdout.readline() + unsecured.stdout.readline()  # type: ignore[union-attr]

        async def anyone_writes() -> None:  # what the warning is about
            registry = EtcdRegistry(EtcdSpec(etcd=[f"127.0.0.1:{port}"]))
            await registry.start()
            await registry.put(NODES + "cloud1", b"forged")
            await registry.close()
        asyncio.run(anyone_writes())
        unsecured.send_signal(signal.SIGINT)
        assert unsecured.wait(timeout=10) == 0
        warning = unsecured.stderr.read()  # type: ignore[union-attr]
        assert "warning: this etcd has no TLS and no auth" in warning and "splitexit etcd --cluster FILE" in warning
    finally:
        if unsecured.poll() is None:
            unsecured.terminate()
            unsecured.wait(timeout=10)

    (pki / "ca.key").unlink()  # a user mistake is one line and exit code 1, no traceback
    keyless = subprocess.run([sys.executable, "-m", "splitexit", "etcd", "--cluster", str(cluster_file), "--data-dir",
                              str(tmp_path / "etcd"), "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert keyless.returncode == 1 and "Traceback" not in keyless.stderr
    assert "ca.key is missing" in keyless.stderr and "on the machine that keeps the CA key" in keyless.stderr


def _port_pair() -> int:
    """A free client port whose next port is free too (`splitexit etcd` puts its peer port there)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
