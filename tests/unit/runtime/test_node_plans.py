"""A node keeps the stages of each edge's newest plans only: a retired plan's stage is freed once its hop is idle.

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
from splitexit.errors import WireError
from splitexit.model.stage_file import sha256_hex, stage_file
from splitexit.runtime.control_messages import Assignment
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


EDGES = """
nodes:
  - {name: camera, role: edge}
  - {name: phone, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
"""


def test_each_edge_keeps_its_own_newest_plans_and_a_shared_plan_lives_while_an_edge_keeps_it(tmp_path: Path) -> None:
    """Plans of two edges on one node: the camera's plan changes never retire the phone's plans, a version
    both assigned is one stage, and it stays (for the phone only) after the camera moved on."""
    net = digits_net()
    cluster = ClusterSpec.model_validate(yaml.safe_load(EDGES))
    files = [stage_file(net, cut, MODEL_OUTPUT) for cut in range(5)]

    async def main() -> tuple[list[dict[int, frozenset[str]]], dict[str, list[int]], list[str]]:
        node = Node(cluster, "cloud1", cache_dir=tmp_path / "cache")
        control = LocalNodeControl(cluster.node("cloud1"), {"cloud1": node})

        async def assign(edge: str, version: int, data: bytes) -> None:
            assignment = Assignment(plan_version=version, stage_sha256=sha256_hex(data), edge=edge, upstream=(edge,))
            if not await control.assign(assignment):
                await control.put_stage(assignment.stage_sha256, data)
                assert await control.assign(assignment)

        def held() -> dict[int, frozenset[str]]:
            return {version: served.upstream for version, served in sorted(node.plans.items())}

        seen, refusals = [], []
        try:
            for version in (1, 2, 3, 4):
                await assign("camera", version, files[version - 1])
            await assign("phone", 10, files[4])
            await assign("phone", 3, files[2])  # the camera's plan 3: the same stage file, so the same stage
            seen.append(held())
            for version in (5, 6, 7):
                await assign("camera", version, files[version - 5])
            seen.append(held())
            for assignment in (Assignment(plan_version=11, stage_sha256=sha256_hex(files[0]), edge="ghost"),
                               Assignment(plan_version=10, stage_sha256=sha256_hex(files[0]), edge="phone")):
                try:
                    await node.assign(assignment)
                except WireError as exc:
                    refusals.append(str(exc))
            return seen, dict(node.holdings), refusals
        finally:
            await node.stop(grace=0)

    seen, holdings, refusals = asyncio.run(main())
    assert seen[0] == {2: {"camera"}, 3: {"camera", "phone"}, 4: {"camera"}, 10: {"phone"}}
    assert seen[1] == {3: {"phone"}, 5: {"camera"}, 6: {"camera"}, 7: {"camera"}, 10: {"phone"}}
    assert holdings == {"camera": [5, 6, 7], "phone": [10, 3]}
    assert "edge 'ghost', which the cluster file does not declare" in refusals[0]
    assert "plan 10 runs stage" in refusals[1] and len(refusals) == 2
