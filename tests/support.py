"""Helpers shared by the system tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

from splitexit.control.local_cluster import free_port

__all__ = ["assign_plans", "digits_net", "free_port", "rss_kib", "start_nodes", "stop_nodes"]


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid``, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def assign_plans(control, files, after=None) -> None:  # noqa: ANN001 - ControlPort, [bytes], callable
    """Assign plan 1, 2, ... each running one stage file, as the edge's coordinator does: Assign, and PutStage
    first when the node lacks the file. ``after(version)`` is awaited after each plan."""
    from splitexit.model.stage_file import sha256_hex
    from splitexit.runtime.control_messages import Assignment

    for version, data in enumerate(files, start=1):
        sha = sha256_hex(data)
        assignment = Assignment(plan_version=version, stage_sha256=sha, upstream=("edge",))
        if not await control.assign(assignment):
            await control.put_stage(sha, data)
            assert await control.assign(assignment)
        if after is not None:
            await after(version)


async def start_nodes(cluster, cache_root):  # noqa: ANN001, ANN201 - ClusterSpec, Path -> list[Node]
    """Start every worker of ``cluster`` in this process (empty: the entry's coordinator assigns stages)."""
    from splitexit.runtime.node import Node

    nodes = [Node(cluster, n.name, cache_dir=cache_root / n.name) for n in cluster.nodes[1:]]
    for node in nodes:
        await node.start()
    return nodes


async def stop_nodes(nodes) -> None:  # noqa: ANN001
    for node in nodes:
        await node.stop(grace=2)


def digits_net(exit_quantile: float = 0.6):  # noqa: ANN201 - EarlyExitNet
    """digits_cnn with random weights and thresholds at ``exit_quantile`` of each exit's confidence on
    random inputs: about ``1 - exit_quantile`` of the rows leave at every early exit."""
    import torch

    from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model

    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = [torch.softmax(o / 0.2, 1).amax(1) for o in net(x)[:-1]]
    net.set_policy(ExitPolicy(temperatures=(0.2,) * net.num_exits,
                              thresholds=tuple(float(s.quantile(exit_quantile)) for s in scores)))
    return net
