"""A user's own model served by nodes that do not have its code (issue 18): the package is trained from a
*relative* ``mymodel.py:build``; worker processes run in another directory, trust nothing, and rebuild the
stage from the graph its file carries. A hostile graph sent to a live node is refused and the node serves on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from splitexit import EarlyExitNet, load, load_dataset, read_spec, split_dataset
from splitexit.app.run import ensure_cluster_token
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.model.stage_file import sha256_hex, stage_file
from support import cli, cli_ok, free_port

pytestmark = pytest.mark.slow

MODEL_CODE = '''
import torch
from torch import nn


class Mine(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(12, 24, 3, padding=1, stride=2), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.body(x) + torch.nn.functional.avg_pool2d(x.repeat(1, 2, 1, 1), 2)
        return self.fc(x.flatten(2).mean(-1))


def build(num_classes: int = 10):
    return Mine(num_classes)
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's directory: their model file and a package trained from it by a relative name."""
    root = tmp_path_factory.mktemp("project")
    (root / "mymodel.py").write_text(MODEL_CODE)
    cli_ok(cli("train", "--model", "mymodel.py:build", "--data", "digits", "--out", "pkg", "--epochs", "3",
               cwd=root))
    assert read_spec(root / "pkg").model.name == "mymodel.py:build"
    return root


def load_in(project: Path, monkeypatch: pytest.MonkeyPatch) -> EarlyExitNet:
    """The package as its user loads it: from their directory, trusting their file by the name it was trained with."""
    monkeypatch.chdir(project)
    return load(project / "pkg", trust_models=["mymodel.py:build"])


def node_process(cluster_file: Path, name: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "splitexit", "node", "--cluster", str(cluster_file), "--name", name,
                             "--cache", str(cwd / f"cache-{name}")], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_nodes_without_the_users_code_serve_its_model_exactly(project: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"  # no mymodel.py here, and the cluster file trusts no model
    elsewhere.mkdir()
    cluster_file = project / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({
        "nodes": [{"name": "edge", "role": "edge"},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"},
                  {"name": "cloud2", "address": f"127.0.0.1:{free_port()}"}],
        "links": [{"from": "edge", "to": "cloud1", "codec": "raw"}, {"from": "cloud1", "to": "cloud2", "codec": "raw"}],
        "batching": {"max_batch": 8, "max_wait": "1ms"}}))
    ensure_cluster_token(cluster_file)
    nodes = [node_process(cluster_file, name, elsewhere) for name in ("cloud1", "cloud2")]
    try:
        for node in nodes:
            ready = node.stdout.readline() if node.stdout else ""
            assert ready.startswith("ready"), ready + (node.stderr.read() if node.stderr else "")
        edge = cli("run", "pkg", "--cluster", str(cluster_file), "--trust-model", "mymodel.py:build",
                   "--out", "results.jsonl", "--no-plan", cwd=project)
        cli_ok(edge)
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)
    records = [json.loads(line) for line in (project / "results.jsonl").read_text().splitlines()]
    net = load_in(project, monkeypatch)
    test = split_dataset(load_dataset("digits"), read_spec(project / "pkg").data).test
    expected = net.infer(torch.stack([test[i][0] for i in range(len(test))]))
    assert all(r["error"] is None for r in records)
    assert [r["prediction"] for r in records] == expected.prediction.tolist(), "answers equal the one-process model"
    assert [r["exit"] for r in records] == expected.exit.tolist()
    assert {r["node"] for r in records} & {"cloud1", "cloud2"}, "the workers answered some inputs"


def hostile_stage(net: EarlyExitNet, graph_change: Callable[[dict], None]) -> bytes:
    """A stage file of ``net`` whose shipped graph ``graph_change`` rewrote (the tensors are the real ones)."""
    data = stage_file(net, MODEL_INPUT, MODEL_OUTPUT)
    length = int.from_bytes(data[:8], "little")
    about = json.loads(json.loads(data[8:8 + length])["__metadata__"]["splitexit"])
    graph = json.loads(about["graph"])
    graph_change(graph)
    about["graph"] = json.dumps(graph)
    return save_tensors(load_tensors(data), metadata={"splitexit": json.dumps(about, sort_keys=True)})


def test_a_hostile_graph_is_refused_by_a_live_node_which_serves_on(project: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from splitexit.config import ClusterSpec
    from splitexit.control.edge import Entry
    from splitexit.runtime.control_client import NodeControl
    from splitexit.runtime.control_messages import Assignment
    from support import start_nodes, stop_nodes

    net = load_in(project, monkeypatch)
    monkeypatch.chdir(tmp_path)  # the node below runs where no mymodel.py is
    marker = tmp_path / "pwned"

    def run_code(graph: dict) -> None:
        graph["nodes"].insert(1, {"op": "call_function", "name": "evil", "target": "builtins.exec", "kwargs": {},
                                  "args": {"tuple": [f"open({str(marker)!r}, 'w')"]}, "scopes": []})

    def foreign_layer(graph: dict) -> None:
        next(iter(graph["modules"].values()))["type"] = "Mine"

    def huge_weights(graph: dict) -> None:
        next(iter(graph["modules"].values()))["parameters"]["weight"]["shape"] = [1 << 30, 1 << 30]

    cluster = ClusterSpec.model_validate({"nodes": [{"name": "edge", "role": "edge"},
                                                    {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}]})
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    async def attack_then_serve() -> tuple[list[str], list[int]]:
        nodes = await start_nodes(cluster, tmp_path)
        control = NodeControl(cluster.node("cloud1"), credentials=None, token=None,
                              message_limit=cluster.message_limit)
        refusals = []
        try:
            for version, change in enumerate((run_code, foreign_layer, huge_weights), start=1):
                data = hostile_stage(net, change)
                await control.put_stage(sha256_hex(data), data)
                try:
                    await control.assign(Assignment(plan_version=version, stage_sha256=sha256_hex(data),
                                                    edge="edge", upstream=("edge",)))
                    refusals.append("accepted")
                except Exception as exc:  # noqa: BLE001 - the refusal is what is looked at
                    refusals.append(str(exc))
            entry = Entry(net, cluster)
            try:
                await entry.start()
                records = [await entry.infer(x[i], index=i) for i in range(len(x))]
            finally:
                await entry.close()
            return refusals, [r.prediction for r in records]
        finally:
            await control.close()
            await stop_nodes(nodes)

    refusals, predictions = asyncio.run(attack_then_serve())
    assert not marker.exists(), "the graph ran code"
    assert "not an allowed tensor operation" in refusals[0], refusals
    assert "not a torch.nn layer" in refusals[1], refusals
    assert "GiB" in refusals[2], refusals
    assert predictions == net.infer(x).prediction.tolist(), "the node serves the honest stage after the attacks"
