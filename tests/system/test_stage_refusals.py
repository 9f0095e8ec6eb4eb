"""A node that cannot take its stage is left out: its replicas carry the tier, and the plan change says which
node refused and why. Only a tier whose every node refused fails the start, naming each node's reason.

The refusal is a real one: the stage is of a user model whose graph cannot ship (``tests/assets/models.py:own_op``
calls a function of its own code), and one replica's cluster file does not list it under ``trusted_models``,
so that node will not build it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, ModelSource, build_model
from splitexit.config import ClusterSpec
from splitexit.control.edge import Entry
from splitexit.errors import ClusterError
from splitexit.runtime.node import Node
from support import free_port

pytestmark = pytest.mark.slow

USER_MODEL = f"{Path(__file__).parents[1] / 'assets' / 'models.py'}:own_op"


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    return EarlyExitNet.from_model(build_model(USER_MODEL, 10).eval(), torch.zeros(1, 1, 8, 8),
                                   source=ModelSource(name=USER_MODEL, num_classes=10)).eval()


def cluster(*, trusting: bool) -> ClusterSpec:
    """The edge and one tier of two replicas (the same ports every time this module asks)."""
    spec = {"nodes": [{"name": "edge", "role": "edge"},
                      *({"name": name, "address": f"127.0.0.1:{port}", "tier": 1} for name, port in PORTS.items())],
            "trusted_models": [USER_MODEL] if trusting else []}
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec)))


PORTS = {"cloud1": free_port(), "cloud1b": free_port()}


async def serve(net: EarlyExitNet, trusting: dict[str, bool], cache: Path, x: torch.Tensor) -> tuple[Entry, list]:
    """Start both replicas, each with its own cluster file, and run ``x`` through an entry."""
    nodes = [Node(cluster(trusting=trusting[name]), name, cache_dir=cache / name) for name in PORTS]
    for node in nodes:
        await node.start()
    entry = Entry(net, cluster(trusting=True))
    try:
        await entry.start()
        records = [await entry.infer(x[i], index=i) for i in range(len(x))]
        return entry, records
    finally:
        await entry.close()
        for node in nodes:
            await node.stop(grace=2)


def test_a_replica_that_refuses_its_stage_is_left_out_and_named(net: EarlyExitNet, tmp_path: Path) -> None:
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    entry, records = asyncio.run(serve(net, {"cloud1": True, "cloud1b": False}, tmp_path, x))
    assert [r.error for r in records if r.error] == []
    assert [r.prediction for r in records] == net.infer(x).prediction.tolist(), "answers equal the model's"
    assert {r.node for r in records} <= {"edge", "cloud1"}, "cloud1b answers nothing"
    coordinator = entry.coordinator
    assert coordinator is not None and coordinator.placement is not None
    assert [s.nodes for s in coordinator.placement.stages[1:]] == [("cloud1",)], coordinator.placement.describe()
    assert "trusted_models" in coordinator.stage_refusals["cloud1b"], coordinator.stage_refusals
    reasons = [c.reason for c in coordinator.changes]
    assert any("cloud1b refused its stage" in r and "trusted_models" in r for r in reasons), reasons


def test_a_tier_whose_every_node_refuses_fails_the_start_naming_each(net: EarlyExitNet, tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="no node of tier 1 can take its stage") as refused:
        asyncio.run(serve(net, {"cloud1": False, "cloud1b": False}, tmp_path, torch.zeros(1, 1, 8, 8)))
    message = str(refused.value)
    assert "cloud1:" in message and "cloud1b:" in message and "trusted_models" in message, message
