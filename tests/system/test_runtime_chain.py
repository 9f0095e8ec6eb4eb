"""Real chains on loopback (gRPC control, framed data plane): answers equal net.infer, exactly one outcome per
input, health stays responsive, and link reports are right (metrics: test_metrics.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from splitexit import EarlyExitNet, ExitPolicy, build_model
from splitexit.config import ClusterSpec, ModelSource, NodeSpec
from splitexit.control.edge import Entry
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.runtime.control_messages import NodeProfile
from splitexit.wire import wire_pb2, wire_pb2_grpc
from support import digits_net, free_port, start_nodes, stop_nodes


def make_cluster(workers: int, *, codec: str = "raw", max_batch: int = 8, window: int = 16,
                 message_limit: str = "64MiB") -> ClusterSpec:
    nodes = [{"name": "edge", "role": "edge"}] + [
        {"name": f"cloud{i}", "address": f"127.0.0.1:{free_port()}"} for i in range(1, workers + 1)]
    names = [n["name"] for n in nodes]
    links = [{"from": a, "to": b, "codec": codec} for a, b in zip(names, names[1:])]
    return ClusterSpec.model_validate(yaml.safe_load(yaml.safe_dump({
        "nodes": nodes, "links": links, "batching": {"max_batch": max_batch, "max_wait": "1ms"},
        "window": window, "message_limit": message_limit})))


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    return digits_net()


@pytest.fixture(scope="module")
def inputs() -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(120, 1, 8, 8, generator=generator),
                         torch.randint(0, 10, (120,), generator=generator))


async def run_chain(net: EarlyExitNet, cluster: ClusterSpec, dataset: TensorDataset, cache: Path,
                    window: int | None = None):
    nodes = await start_nodes(cluster, cache)
    entry = Entry(net, cluster, window=window)
    try:
        await entry.start()
        return await entry.run(dataset)
    finally:
        await entry.close()
        await stop_nodes(nodes)


def test_raw_chain_gives_net_infer_answers_for_every_input(net: EarlyExitNet, inputs: TensorDataset,
                                                            tmp_path: Path) -> None:
    result = asyncio.run(run_chain(net, make_cluster(2), inputs, tmp_path))
    expected = net.infer(inputs.tensors[0])
    records = sorted(result.records, key=lambda r: r.index)
    assert [r.error for r in records if r.error] == []
    assert [r.prediction for r in records] == expected.prediction.tolist()
    assert [r.exit for r in records] == expected.exit.tolist()
    assert {r.node for r in records} == {"edge", "cloud1", "cloud2"}
    assert result.links["edge->cloud1"].rows > 0 and result.links["cloud1->cloud2"].rows > 0


def test_int8_chain_stays_close_in_accuracy(net: EarlyExitNet, inputs: TensorDataset, tmp_path: Path) -> None:
    expected = net.infer(inputs.tensors[0]).prediction
    labels = expected  # agreement with the uncompressed answers is the accuracy that codecs can lose
    result = asyncio.run(run_chain(net, make_cluster(2, codec="int8+zstd"), inputs, tmp_path))
    got = torch.tensor([r.prediction for r in sorted(result.records, key=lambda r: r.index)])
    agreement = float((got == labels).float().mean())
    assert agreement >= 0.95, agreement
    link = result.links["edge->cloud1"]
    assert link.wire_bytes < link.raw_bytes / 2


@pytest.mark.parametrize("window, max_batch", [(1, 1), (4, 1), (16, 1), (1, 8), (4, 8), (16, 8)])
def test_exactly_one_outcome_per_input(net: EarlyExitNet, inputs: TensorDataset, window: int, max_batch: int,
                                       tmp_path: Path) -> None:
    subset = TensorDataset(*(t[:48] for t in inputs.tensors))
    result = asyncio.run(run_chain(net, make_cluster(2, max_batch=max_batch), subset, tmp_path, window=window))
    assert sorted(r.index for r in result.records) == list(range(48))
    assert len({r.request_id for r in result.records}) == 48
    assert all(r.error is None for r in result.records)


def test_four_node_chain(net: EarlyExitNet, inputs: TensorDataset, tmp_path: Path) -> None:
    result = asyncio.run(run_chain(net, make_cluster(3), inputs, tmp_path))
    expected = net.infer(inputs.tensors[0])
    records = sorted(result.records, key=lambda r: r.index)
    assert [r.prediction for r in records] == expected.prediction.tolist()
    assert len(result.placement.stages) == 4


def test_replicas_share_the_load_even_one_request_at_a_time(net: EarlyExitNet, inputs: TensorDataset,
                                                            tmp_path: Path) -> None:
    spec = yaml.safe_load(yaml.safe_dump(make_cluster(1).model_dump(by_alias=True, mode="json")))
    spec["nodes"] += [{"name": f"replica{i}", "address": f"127.0.0.1:{free_port()}", "tier": 1} for i in (2, 3)]
    cluster = ClusterSpec.model_validate(spec)
    result = asyncio.run(run_chain(net, cluster, inputs, tmp_path, window=1))
    sent = {name: link.rows for name, link in result.links.items()}
    assert set(sent) == {"edge->cloud1", "edge->replica2", "edge->replica3"}, sent
    assert max(sent.values()) <= 2 * min(sent.values()), f"idle replicas should take turns: {sent}"
    assert sorted(r.prediction for r in result.records) == sorted(net.infer(inputs.tensors[0]).prediction.tolist())


@pytest.mark.slow
def test_resnet18_over_three_nodes_equals_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    x = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    net = EarlyExitNet.from_model(model, x[:1], source=ModelSource(name="resnet18", num_classes=10)).eval()
    # uncalibrated: every input runs to the last node
    result = asyncio.run(run_chain(net, make_cluster(2, message_limit="256KiB"), TensorDataset(x, torch.zeros(6)),
                                   tmp_path))
    with torch.no_grad():
        expected = model(x)
    records = sorted(result.records, key=lambda r: r.index)
    assert all(r.node == "cloud2" for r in records)
    assert [r.prediction for r in records] == expected.argmax(1).tolist()
    link = result.links["edge->cloud1"]  # 401 KB a row: every frame is above the 256 KiB (control) message limit
    assert link.rows == 6 and link.wire_bytes / link.messages > 256 * 1024, link
    assert link.raw_bytes < link.wire_bytes < 1.01 * link.raw_bytes, link


# --------------------------------------------------------------------------- the event loop stays free
async def _health_while_busy(net: EarlyExitNet, cache: Path) -> tuple[float, float]:
    cluster = make_cluster(1)
    slow = ClusterSpec.model_validate({**cluster.model_dump(by_alias=True),
                                       "nodes": [cluster.nodes[0].model_dump(),
                                                 {**cluster.nodes[1].model_dump(), "slowdown": 3000.0}]})
    (node,) = await start_nodes(slow, cache)
    entry = Entry(net, slow)
    try:
        await entry.start()
        busy = asyncio.get_running_loop().create_task(entry.infer(torch.randn(1, 8, 8)))
        while node.in_flight == 0:  # wait until the request is inside cloud1's stage
            await asyncio.sleep(0.005)
        async with grpc.aio.insecure_channel(slow.node("cloud1").address) as channel:
            started = asyncio.get_running_loop().time()
            reply = await wire_pb2_grpc.StageServiceStub(channel).Health(wire_pb2.HealthRequest(), timeout=5)
            health_s = asyncio.get_running_loop().time() - started
        assert reply.in_flight == 1
        record = await busy
        return health_s, record.latency_ms / 1e3
    finally:
        await entry.close()
        await node.stop(grace=2)


def test_health_answers_while_the_stage_computes(tmp_path: Path) -> None:
    net = digits_net()  # its own net: the policy below would change the module fixture's answers
    net.set_policy(ExitPolicy(temperatures=(1.0,) * net.num_exits, thresholds=(2.0,) * len(net.exit_cuts)))
    health_s, request_s = asyncio.run(_health_while_busy(net, tmp_path))
    assert request_s > 0.2, "the slowed stage should take a while"
    assert health_s < request_s / 4, (health_s, request_s)


def test_an_edge_that_ends_at_the_input_ships_it_unprocessed(net: EarlyExitNet, inputs: TensorDataset,
                                                            tmp_path: Path) -> None:
    base = make_cluster(1)
    cluster = ClusterSpec.model_validate({**base.model_dump(by_alias=True), "nodes": [
        {**base.nodes[0].model_dump(), "ends_at": "input"}, base.nodes[1].model_dump()]})
    result = asyncio.run(run_chain(net, cluster, inputs, tmp_path))
    expected = net.infer(inputs.tensors[0])
    records = sorted(result.records, key=lambda r: r.index)
    assert [r.prediction for r in records] == expected.prediction.tolist()
    assert {r.node for r in records} == {"cloud1"}, "the edge computes nothing: cloud-only"
    assert result.links["edge->cloud1"].raw_bytes == len(inputs) * 8 * 8 * 4, "the input itself crossed"


# --------------------------------------------------------------------------- profiling requests
async def _profile_requests(net: EarlyExitNet, cluster: ClusterSpec, dataset: TensorDataset, cache: Path
                            ) -> dict[str, object]:
    from splitexit.model.stage_file import sha256_hex, stage_file
    from splitexit.runtime.control_client import NodeControl
    from splitexit.runtime.control_messages import ProfileJob

    nodes = await start_nodes(cluster, cache)
    entry = Entry(net, cluster)
    control = NodeControl(cluster.node("cloud1"), credentials=None, token=None, message_limit=cluster.message_limit)
    outcomes: dict[str, object] = {}
    try:
        await entry.start()
        whole = stage_file(net, MODEL_INPUT, MODEL_OUTPUT)
        cuts = [c.id for c in net.graph.cut_points]

        def request(**changes: object) -> ProfileJob:
            job = ProfileJob(stage_sha256=sha256_hex(whole), cuts=tuple(cuts), batch_sizes=(1, 2), repeats=2)
            return replace(job, **changes)  # type: ignore[arg-type]  # each test case changes one field

        async def outcome(req: ProfileJob) -> object:
            try:
                return await control.profile(req)
            except Exception as exc:  # noqa: BLE001 - the refusal is what is looked at
                return f"{type(exc).__name__}: {exc}"

        outcomes["unknown stage"] = (await outcome(request())).missing_stage  # type: ignore[union-attr]
        served = nodes[0].plans[nodes[0].newest].sha256
        outcomes["part of the model"] = await outcome(request(stage_sha256=served))
        await control.put_stage(sha256_hex(whole), whole)
        outcomes["cuts out of order"] = await outcome(request(cuts=tuple(cuts[::-1])))
        outcomes["unknown cut"] = await outcome(request(cuts=(*cuts, 999)))
        outcomes["huge batch"] = await outcome(request(batch_sizes=(1, 100_000)))
        outcomes["no repeats"] = await outcome(request(repeats=0))
        outcomes["stranger"] = await outcome(request(links=(NodeSpec(name="mallory", address="127.0.0.1:1"),)))
        outcomes["good"] = await outcome(request())
        outcomes["still serving"] = await entry.run(dataset)
    finally:
        await control.close()
        await entry.close()
        await stop_nodes(nodes)
    return outcomes


def test_bad_profile_requests_are_refused_and_the_node_keeps_serving(net: EarlyExitNet, inputs: TensorDataset,
                                                                    tmp_path: Path) -> None:
    outcomes = asyncio.run(_profile_requests(net, make_cluster(2), inputs, tmp_path))
    assert outcomes["unknown stage"] is True
    for case, phrase in (("part of the model", "whole model"), ("cuts out of order", "forward order"),
                         ("unknown cut", "cut ids of this model"), ("huge batch", "batch sizes must be 1..256"),
                         ("no repeats", "repeats must be"), ("stranger", "not a node of this cluster")):
        assert isinstance(outcomes[case], str) and "cloud1 refused" in outcomes[case] and phrase in outcomes[case], \
            (case, outcomes[case])
    good = outcomes["good"]
    assert isinstance(good, NodeProfile) and good.machine and good.timing is not None
    timing = good.timing
    assert len(timing.segments) == len(net.graph.cut_points) + 1 and len(timing.heads) == net.num_exits
    assert all([batch for batch, _ in part] == [1, 2] for part in [*timing.segments, *timing.heads])
    result = outcomes["still serving"]
    assert len(result.records) == len(inputs) and all(r.error is None for r in result.records)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- links measured further down
async def _bandwidths_after_traffic(net: EarlyExitNet, cluster: ClusterSpec, dataset: TensorDataset, cache: Path
                                    ) -> tuple[dict[tuple[str, str], float], list]:
    nodes = await start_nodes(cluster, cache)
    entry = Entry(net, cluster)
    try:
        await entry.start()
        result = await entry.run(dataset)
        return await entry.link_bandwidths(), result.records
    finally:
        await entry.close()
        await stop_nodes(nodes)


def test_the_entry_sees_what_every_link_of_the_chain_delivers(net: EarlyExitNet, inputs: TensorDataset,
                                                               tmp_path: Path) -> None:
    spec = make_cluster(2, window=4)
    links = [{"from": "edge", "to": "cloud1", "bandwidth": "5Mbit"},  # slow enough that serialisation
             {"from": "cloud1", "to": "cloud2", "bandwidth": "2Mbit"}]  # dominates an 8 kB message
    cluster = ClusterSpec.model_validate({**spec.model_dump(by_alias=True), "links": links})
    bandwidths, records = asyncio.run(_bandwidths_after_traffic(net, cluster, inputs, tmp_path))
    assert {r.node for r in records} == {"edge", "cloud1", "cloud2"}, "rows crossed both links"
    assert set(bandwidths) == {("edge", "cloud1"), ("cloud1", "cloud2")}, bandwidths
    assert 0.5 * 5e6 <= bandwidths[("edge", "cloud1")] <= 1.05 * 5e6, bandwidths
    assert 0.5 * 2e6 <= bandwidths[("cloud1", "cloud2")] <= 1.05 * 2e6, bandwidths  # cloud1's, through Health
