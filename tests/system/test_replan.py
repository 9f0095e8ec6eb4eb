"""Online re-planning: the uplink drops from 100 to 2 Mbit/s mid-run and the entry moves to a better plan.

mobilenet_v3_small on 3x64x64 inputs (random weights), an edge 4x slower than the cloud node, an uplink of
100 Mbit/s and 1 ms that drops to 2 Mbit/s three seconds into the run (the planner is not told: it has to
measure). At 100 Mbit/s shipping the input to the cloud is fastest; at 2 Mbit/s the input takes ~50 ms to
cross and computing on the edge wins. The entry must switch within 5 s of the drop, lose and duplicate
nothing, and say when and why.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, ModelSource, build_model, save
from splitexit.config import ClusterSpec, DataSplit
from splitexit.model.stages import INPUT
from splitexit.plan.planner import Objective
from splitexit.plan.workflow import profile_package
from splitexit.runtime import link
from splitexit.runtime.entry import Entry
from splitexit.runtime.replan import PlannedLayout
from support import free_port, start_nodes, stop_nodes

pytestmark = pytest.mark.slow

DROP_AT = 3.0
RATE, DURATION = 40, 10.0


def cluster() -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge", "slowdown": 4},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "bandwidth": "100Mbit", "latency": "1ms", "codec": "auto",
                   "changes": [{"at": f"{DROP_AT}s", "bandwidth": "2Mbit"}]}],
        "batching": {"max_batch": 4, "max_wait": "1ms"}, "window": 8})))


def test_a_bandwidth_drop_makes_the_entry_switch_plans(tmp_path: Path) -> None:
    torch.manual_seed(0)
    name = "mobilenet_v3_small"
    net = EarlyExitNet.from_model(build_model(name, 10).eval(), torch.zeros(1, 3, 64, 64),
                                  source=ModelSource(name=name, num_classes=10)).eval()
    save(net, tmp_path / "pkg", data=DataSplit(dataset="synthetic:3x64x64:64"))
    profile = profile_package(tmp_path / "pkg").profile
    spec = cluster()
    x = torch.randn(int(RATE * DURATION), 3, 64, 64, generator=torch.Generator().manual_seed(1))

    async def run():  # noqa: ANN202
        nodes = await start_nodes(spec, tmp_path / "stages")
        entry = Entry(net, spec, layout=PlannedLayout(net, profile, Objective()))
        try:
            await entry.start()
            first = entry.placement
            tasks = []
            for i in range(len(x)):
                tasks.append(asyncio.get_running_loop().create_task(entry.infer(x[i], index=i)))
                await asyncio.sleep(1 / RATE)
            records = await asyncio.gather(*tasks)
            return first, records, list(entry.coordinator.changes)  # type: ignore[union-attr]
        finally:
            await entry.close()
            await stop_nodes(nodes)

    first, records, changes = asyncio.run(run())
    assert first.stages[0].end == INPUT, f"at 100 Mbit/s the input should go to the cloud: {first.describe()}"
    origin = link._ORIGINS[("edge", "cloud1")]  # monotonic time the link first carried a message
    dropped_at = time.time() - (time.monotonic() - origin) + DROP_AT
    switches = [c for c in changes[1:] if "measured" in c.reason]
    assert switches, f"no re-plan after the drop; plans: {[c.reason for c in changes]}"
    switch = switches[0]
    assert switch.time - dropped_at <= 5.0, f"switched {switch.time - dropped_at:.1f} s after the drop"
    assert "edge->cloud1 measured" in switch.reason and "Mbit/s" in switch.reason
    assert switch.placement.stages[0].end != INPUT, "after the drop the edge should compute"
    assert [r.index for r in sorted(records, key=lambda r: r.index)] == list(range(len(x)))
    assert len({r.request_id for r in records}) == len(x), "no request answered twice"
    assert [r.error for r in records if r.error] == [], "no request lost"
