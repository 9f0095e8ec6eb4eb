"""A node that turns the edge away is reported at once, naming the node, the cause and the fix.

Real nodes in this process with TLS and a token. The edge starts with one thing wrong: the token, its CA,
or a node whose certificate names another node. ``Entry.start`` used to wait 30 s and then say that no
node was up; it must now fail within seconds with a message that says what is wrong.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import yaml

from splitexit import ClusterError
from splitexit.config import ClusterSpec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.runtime.security import init_ca, issue_certificate
from support import digits_net, free_port, start_nodes, stop_nodes

TOKEN = "refusals-reported-token-0123"
#: What the edge waits for its tiers without a diagnosis; a refusal must be reported well before.
START_WAIT = 30.0


def cluster_file(root: Path, tls: Path, token: str) -> Path:
    (root / f"token-{token[:5]}").write_text(token + "\n")
    path = root / f"cluster-{tls.name}-{token[:5]}.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge"}, {"name": "cloud1", "address": ADDRESS}],
        "security": {"tls": str(tls), "token_file": f"token-{token[:5]}"}}))
    return path


ADDRESS = f"127.0.0.1:{free_port()}"


def pki(root: Path) -> tuple[Path, Path, Path]:
    """The cluster's certificates, a foreign CA's, and the cluster's with cloud1 holding cloud2's certificate."""
    good, foreign, swapped = root / "pki", root / "foreign", root / "swapped"
    for directory in (good, foreign):
        init_ca(directory)
        for name in ("edge", "cloud1", "cloud2"):
            issue_certificate(directory, name)
    shutil.copytree(good, swapped)
    for suffix in (".pem", ".key"):
        shutil.copy(good / f"cloud2{suffix}", swapped / f"cloud1{suffix}")
    return good, foreign, swapped


async def refused_start(edge_cluster: ClusterSpec) -> tuple[str, float]:
    """What ``Entry.start`` refused with, and after how many seconds."""
    entry = Entry(digits_net(), edge_cluster, start_timeout=START_WAIT)
    started = time.monotonic()
    try:
        with pytest.raises(ClusterError) as refused:
            await entry.start()
        return str(refused.value), time.monotonic() - started
    finally:
        await entry.close()


async def start_refused(node_cluster: ClusterSpec, edge_cluster: ClusterSpec, cache: Path) -> tuple[str, float]:
    nodes = await start_nodes(node_cluster, cache)
    try:
        return await refused_start(edge_cluster)
    finally:
        await stop_nodes(nodes)


@pytest.mark.parametrize("case, says", [
    ("wrong token", "token"),
    ("foreign CA", "same cluster CA"),
    ("certificate names another node", "does not name it 'cloud1'"),
])
def test_a_refusing_node_is_reported_at_once_with_the_cause(case: str, says: str, tmp_path: Path) -> None:
    good, foreign, swapped = pki(tmp_path)
    nodes_tls, edge_tls, edge_token = {"wrong token": (good, good, "not-the-token-at-all-0123"),
                                       "foreign CA": (good, foreign, TOKEN),
                                       "certificate names another node": (swapped, good, TOKEN)}[case]
    node_cluster = load_cluster(cluster_file(tmp_path, nodes_tls, TOKEN))
    edge_cluster = load_cluster(cluster_file(tmp_path, edge_tls, edge_token))
    message, elapsed = asyncio.run(start_refused(node_cluster, edge_cluster, tmp_path / "stages"))
    assert "no node of tier 1 accepts this edge" in message and "cloud1" in message and says in message, message
    assert elapsed < START_WAIT / 3, f"reported after {elapsed:.1f} s"


def test_plain_text_to_an_address_outside_loopback_is_refused_at_once(tmp_path: Path) -> None:
    """The edge never sends a byte in plain text beyond loopback (nodes already refuse to listen there)."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"name": "edge", "role": "edge"},
                                              {"name": "cloud1", "address": "10.255.255.1:50061"}]}))
    message, elapsed = asyncio.run(refused_start(load_cluster(path)))
    assert "refusing to talk to cloud1 at 10.255.255.1:50061 in plain text" in message and "security" in message
    assert elapsed < START_WAIT / 3, f"reported after {elapsed:.1f} s"
