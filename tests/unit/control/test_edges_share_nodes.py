"""Two edges' coordinators placing their plans on the same nodes at once, in this process.

Real nodes reached through the in-process control twin, a real embedded registry per edge (as each
`splitexit run` has its own), and a model wide enough that its stage file travels in several chunks, so
the two edges' uploads to a node overlap and the second is turned away as busy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
import yaml

from splitexit import EarlyExitNet, build_model
from splitexit.config import ClusterSpec, ModelSource, NodeSpec
from splitexit.config.codec_names import CodecSpec
from splitexit.control.coordinator import Coordinator
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.members import NODES, NodeInfo
from splitexit.errors import NodeBusyError
from splitexit.runtime.local_control import LocalNodeControl
from splitexit.runtime.node import Node
from splitexit.runtime.placement import Placement

CLUSTER = """
nodes:
  - {name: camera, role: edge}
  - {name: phone, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
  - {name: cloud2, address: "127.0.0.1:50062"}
"""
#: Classes of the wide model: a stage file of a few MiB, uploaded in 1 MiB chunks.
WIDE_CLASSES = 64_000


class CountingControl(LocalNodeControl):
    """The in-process twin, counting the uploads a node turned away as busy."""

    busy: list[str] = []

    async def put_stage(self, sha256: str, data: bytes) -> None:
        try:
            await super().put_stage(sha256, data)
        except NodeBusyError:
            self.busy.append(self.spec.name)
            raise


def test_two_edges_starting_at_once_ship_each_file_once_and_both_plans_are_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn", WIDE_CLASSES), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=WIDE_CLASSES)).eval()
    cluster = ClusterSpec.model_validate(yaml.safe_load(CLUSTER))

    async def go() -> tuple[dict[str, Placement], list[tuple[str, str, int]], dict[str, dict[str, list[int]]],
                            dict[str, set[str]]]:
        nodes = {name: Node(cluster, name, cache_dir=tmp_path / name) for name in ("cloud1", "cloud2")}
        installed: dict[str, Placement] = {}
        coordinators = []
        for edge in ("camera", "phone"):
            registry = EmbeddedRegistry()
            for name in nodes:
                lease = await registry.grant(600.0)
                info = NodeInfo(name=name, address=cluster.node(name).address or "", tier=1)
                await registry.put(NODES + name, info.to_bytes(), lease=lease)

            async def on_plan(placement: Placement, peers: list[NodeSpec], codec: CodecSpec | None,
                              edge: str = edge) -> None:
                installed[edge] = placement

            coordinators.append(Coordinator(net, cluster.for_edge(edge), registry, on_plan,
                                            connect=lambda node: CountingControl(node, nodes)))
        try:
            await asyncio.gather(*(coordinator.start() for coordinator in coordinators))
            shipments = [s for coordinator in coordinators for s in coordinator.shipments]
            holdings = {name: dict(node.holdings) for name, node in nodes.items()}
            banned = {c.edge.name: {n for n in nodes if c.bans.banned(n)} for c in coordinators}
            return installed, shipments, holdings, banned
        finally:
            for coordinator in coordinators:
                await coordinator.close()
            for node in nodes.values():
                await node.stop(grace=0)

    installed, shipments, holdings, banned = asyncio.run(go())
    assert installed["camera"].version == installed["phone"].version, "one layout, one plan version"
    version = installed["camera"].version
    assert sorted((node, sha) for node, sha, _ in shipments) == sorted({(node, sha) for node, sha, _ in shipments}), \
        "each node got each stage file once, from whichever edge asked first"
    assert sorted(node for node, _, _ in shipments) == ["cloud1", "cloud2"]
    assert CountingControl.busy, "the second edge's upload overlapped the first and was turned away as busy"
    assert holdings == {name: {"camera": [version], "phone": [version]} for name in ("cloud1", "cloud2")}
    assert banned == {"camera": set(), "phone": set()}, "a busy node is asked again, not left out"
