"""Registry entries are claims: a rogue write to etcd takes no traffic and does not stop planning.

A real etcd, a real worker process, and an impostor: a gRPC server on loopback that records every call
it is sent (with TLS it holds a certificate for ``cloud1`` from another CA). After the worker has registered,
the attacker, who can write etcd, puts three entries: ``nodes/cloud1`` pointing at the impostor (a hijack),
``nodes/evil`` at the impostor in tier 1 (a replica that would take half the traffic), and ``nodes/ghost``
in a tier the cluster file does not have (which used to make every re-plan fail). The edge then serves
inputs: every one must be answered by the real nodes, exactly as the model answers it, and the impostor
must not receive a single call (no Assign, no stage file, no token, no input).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from splitexit import EarlyExitNet
from splitexit.config import EtcdSpec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.etcd_registry import EtcdRegistry
from splitexit.control.etcd_server import DevEtcd
from splitexit.control.local_cluster import LocalCluster
from splitexit.control.members import NODES, NodeInfo
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.security import init_ca, issue_certificate
from support import digits_net, free_port

pytestmark = pytest.mark.slow

TOKEN = "rogue-registrations-token-0123"
#: Long enough that the worker does not re-put its own entry (every TTL / 3) while the edge plans and serves.
TTL = 30.0
INPUTS = 24
#: The attacker's entries: name -> the tier it claims.
FORGED = {"cloud1": 1, "evil": 1, "ghost": 7}


class Impostor:
    """A gRPC server that answers every call with UNIMPLEMENTED and records the method it was asked for."""

    def __init__(self, credentials: grpc.ServerCredentials | None):
        self.calls: list[str] = []
        self.credentials = credentials
        self.address = f"127.0.0.1:{free_port()}"
        self._server: grpc.aio.Server | None = None

    async def __aenter__(self) -> Impostor:
        calls = self.calls

        class Recorder(grpc.GenericRpcHandler):
            def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
                calls.append(handler_call_details.method)
                return None

        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((Recorder(),))
        if self.credentials is None:
            self._server.add_insecure_port(self.address)
        else:
            self._server.add_secure_port(self.address, self.credentials)
        await self._server.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        await self._server.stop(grace=0)


def write_cluster(root: Path, etcd: DevEtcd, tls: Path | None) -> Path:
    (root / "token").write_text(TOKEN + "\n")
    security: dict[str, str] = {"token_file": "token"}
    if tls is not None:
        security["tls"] = str(tls)
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "registry": {"etcd": [etcd.endpoint], "ttl": TTL},
        "nodes": [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}],
        "security": security}))
    return path


def impostor_credentials(root: Path) -> grpc.ServerCredentials:
    """A certificate for ``cloud1``, from a CA the cluster does not trust."""
    other = root / "other-ca"
    init_ca(other)
    cert, key = issue_certificate(other, "cloud1")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


async def attack_and_serve(cluster_file: Path, net: EarlyExitNet, impostor: Impostor, x: torch.Tensor
                           ) -> tuple[list[RequestRecord], dict[str, bytes]]:
    """Forge the three entries, then start an edge and send every input; the records, and etcd's entries as
    the edge found them."""
    cluster = load_cluster(cluster_file)
    assert isinstance(cluster.registry, EtcdSpec)
    attacker = EtcdRegistry(cluster.registry)
    await attacker.start()
    try:
        for name, tier in FORGED.items():
            info = NodeInfo(name=name, address=impostor.address, tier=tier, incarnation=f"forged-{name}")
            await attacker.put(NODES + name, info.to_bytes())
        seen = await attacker.items(NODES)
        entry = Entry(net, cluster)
        try:
            await entry.start()
            records = [await entry.infer(sample, index=i) for i, sample in enumerate(x)]
        finally:
            await entry.close()
    finally:
        await attacker.close()
    return records, seen


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_forged_registrations_get_no_traffic_and_planning_goes_on(tls: bool, tmp_path: Path) -> None:
    pki = None
    if tls:
        pki = tmp_path / "pki"
        init_ca(pki)
        for name in ("edge", "cloud1"):
            issue_certificate(pki, name)
    net = digits_net(exit_quantile=0.5)
    x = torch.randn(INPUTS, 1, 8, 8, generator=torch.Generator().manual_seed(21))
    expected = net.infer(x).prediction.tolist()
    with DevEtcd(tmp_path / "etcd") as etcd:
        cluster_file = write_cluster(tmp_path, etcd, pki)
        with LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=tmp_path, cache_root=tmp_path / "stages"):
            impostor = Impostor(impostor_credentials(tmp_path) if tls else None)

            async def main() -> tuple[list[RequestRecord], dict[str, bytes]]:
                async with impostor:
                    return await attack_and_serve(cluster_file, net, impostor, x)
            records, seen = asyncio.run(main())
    assert sorted(seen) == [NODES + n for n in ("cloud1", "evil", "ghost")]
    assert json.loads(seen[NODES + "cloud1"])["address"] == impostor.address, "the hijack was in place"
    assert impostor.calls == [], f"the impostor was sent {impostor.calls}"
    assert [r.error for r in records] == [None] * INPUTS, "planning went on despite the fake tier"
    assert [r.prediction for r in records] == expected
    nodes = {r.node for r in records}
    assert nodes <= {"edge", "cloud1"} and "cloud1" in nodes
