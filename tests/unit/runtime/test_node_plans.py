"""A node keeps the stages of its newest plans only: a retired plan's stage is freed once its hop is idle.

A real node in this process, assigned through the in-process control twin (protobuf encode and decode
included), eight plans in a row, each with a stage file of its own.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import yaml

from splitexit.config import ClusterSpec
from splitexit.cuts import MODEL_OUTPUT
from splitexit.model.stage_file import stage_file
from splitexit.runtime.local_control import LocalNodeControl
from splitexit.runtime.node import KEEP_PLANS, Node
from support import assign_plans, digits_net

CLUSTER = """
nodes:
  - {name: edge, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
"""
PLANS = 8
#: Real seconds the retired hops have to close (they are idle: one poll of the hop).
PATIENCE = 10.0


def test_eight_plan_changes_keep_only_the_newest_plans_stages_in_memory(tmp_path: Path) -> None:
    net = digits_net()
    cluster = ClusterSpec.model_validate(yaml.safe_load(CLUSTER))
    files = [stage_file(net, cut, MODEL_OUTPUT) for cut in range(PLANS)]  # eight different stages

    async def main() -> tuple[int, set[str], list[bool], set[str]]:
        node = Node(cluster, "cloud1", cache_dir=tmp_path / "cache")
        control = LocalNodeControl(cluster.node("cloud1"), {"cloud1": node})
        nets: list[weakref.ref] = []
        async def keep_a_reference(version: int) -> None:
            nets.append(weakref.ref(node.plans[version].stage.net))

        try:
            await assign_plans(control, files, keep_a_reference)
            deadline = time.monotonic() + PATIENCE
            while node._retiring and time.monotonic() < deadline:  # the retired hops close once idle
                await asyncio.sleep(0.05)
            gc.collect()
            alive = [ref() is not None for ref in nets]
            return len(node.plans), set(node._loaded), alive, {node.plans[v].sha256 for v in node.plans}
        finally:
            await node.stop(grace=0)

    kept, loaded, alive, kept_shas = asyncio.run(main())
    assert kept == KEEP_PLANS
    assert loaded == kept_shas, "only the kept plans' stages stay loaded"
    assert alive == [False] * (PLANS - KEEP_PLANS) + [True] * KEEP_PLANS, "the retired plans' models were freed"
