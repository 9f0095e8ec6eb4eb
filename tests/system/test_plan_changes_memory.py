"""A node's memory comes back after plan changes (issue 12, finding 6).

The finding: a node kept every stage it ever loaded (8 plans: 720 → 1,219 MiB although 3 are kept).
Here a real `splitexit node` process is sent eight plans in a row, as the edge's coordinator sends them
(PutStage, then Assign, over gRPC with the token), each a stage of resnet18 (random weights) starting at
a different cut. Its RSS once the keep window is full (three plans) and after all eight must agree within
10 %: eight resnet18 stages kept would add over 200 MiB.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, ModelSource, build_model
from splitexit.app.run import ensure_cluster_token
from splitexit.config.load import load_cluster
from splitexit.control.local_cluster import LocalCluster
from splitexit.cuts import MODEL_OUTPUT
from splitexit.model.stage_file import stage_file
from splitexit.runtime.control_client import NodeControl
from splitexit.runtime.node import KEEP_PLANS
from support import assign_plans, free_port, rss_kib

pytestmark = pytest.mark.slow

PLANS = 8
#: Seconds the node has to close a retired plan's idle hop and free its stage.
SETTLE = 3.0


def test_eight_plan_changes_give_the_memory_of_retired_plans_back(tmp_path: Path) -> None:
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"nodes": [{"name": "edge", "role": "edge"},
                                                      {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}]}))
    ensure_cluster_token(cluster_file)
    cluster = load_cluster(cluster_file)
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("resnet18", num_classes=10), torch.zeros(1, 3, 64, 64),
                                  source=ModelSource(name="resnet18", num_classes=10)).eval()
    cuts = [c.id for c in net.graph.cut_points][:PLANS]
    files = [stage_file(net, cut, MODEL_OUTPUT) for cut in cuts]

    async def change_plans(pid: int) -> list[float]:
        control = NodeControl(cluster.node("cloud1"), credentials=None, token=cluster.security.token,
                              message_limit=cluster.message_limit)
        rss: list[float] = []

        async def measure(_: int) -> None:
            await asyncio.sleep(SETTLE)
            rss.append(rss_kib(pid) / 1024)

        try:
            await assign_plans(control, files, measure)
        finally:
            await control.close()
        return rss

    with LocalCluster(cluster_file, cluster, log_dir=tmp_path, cache_root=tmp_path / "stages") as local:
        started = time.monotonic()
        rss = asyncio.run(change_plans(local.processes["cloud1"].pid))
        assert local.processes["cloud1"].poll() is None
    print(f"RSS MiB after each plan: {[round(r) for r in rss]} ({time.monotonic() - started:.1f} s)")
    full = rss[KEEP_PLANS - 1]
    assert rss[-1] <= full * 1.10, f"RSS grew from {full:.0f} MiB (3 plans) to {rss[-1]:.0f} MiB (8 plans)"
