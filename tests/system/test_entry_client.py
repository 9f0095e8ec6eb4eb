"""The synchronous Python API against real node processes started by LocalCluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from splitexit import (
    EarlyExitNet,
    EntryClient,
    ExitPolicy,
    ModelSource,
    build_model,
    save,
)
from splitexit.app.run import ensure_cluster_token
from splitexit.config.load import load_cluster
from splitexit.control.local_cluster import LocalCluster
from support import free_port

pytestmark = pytest.mark.slow



def test_submit_and_run_through_local_node_processes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        scores = [torch.softmax(o / 0.2, 1).amax(1) for o in net(x)[:-1]]
    net.set_policy(ExitPolicy(temperatures=(0.2,) * net.num_exits,
                              thresholds=tuple(float(s.median()) for s in scores)))
    save(net, tmp_path / "pkg")
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({
        "package": "pkg",  # relative to the cluster file
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}]}))
    ensure_cluster_token(cluster_file)
    cluster = load_cluster(cluster_file)
    expected = net.infer(x)
    with LocalCluster(cluster_file, cluster, log_dir=tmp_path, cache_root=tmp_path / "stages") as local:
        assert set(local.processes) == {"cloud1", "cloud2"}
        with EntryClient(net, cluster) as client:
            one = client.submit(x[3], label=7).result(timeout=30)
            result = client.run(TensorDataset(x, torch.zeros(40, dtype=torch.long)))
        pids = [p.pid for p in local.processes.values()]
    assert one.prediction == int(expected.prediction[3]) and one.label == 7 and one.error is None
    records = sorted(result.records, key=lambda r: r.index)
    assert [r.prediction for r in records] == expected.prediction.tolist()
    assert {r.node for r in records} == {"edge", "cloud1", "cloud2"}
    for pid in pids:  # stopped: no process is left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
