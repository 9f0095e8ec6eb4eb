"""Hostile peers on a node's data plane (issue 13): each attack is refused or bounded, Health answers within
a second, a well-formed batch sent meanwhile gets the model's answer, and resident memory after the attack
is within 20 % of what it was warm (after one good batch).

The node runs in this process (its coordinator-assigned stage is the second half of digits_cnn); every
attacker holds the token, as a compromised or buggy member would. The RSS measured is this process's, the
attackers' memory included: an upper bound of the node's own growth.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
from pathlib import Path

import grpc
import pytest
import torch

from splitexit import EarlyExitNet, ExitPolicy
from splitexit.config import ClusterSpec
from splitexit.config.codec_names import parse_codec
from splitexit.control.edge import Entry
from splitexit.cuts import MODEL_INPUT
from splitexit.runtime.data_service import DataService
from splitexit.runtime.result_messages import decode_results
from splitexit.runtime.security import token_metadata
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.data_messages import batch_frame, encode_tensors
from splitexit.wire.framing import FrameType
from support import data_connection, digits_net, free_port, rss_kib, start_nodes, stop_nodes

pytestmark = pytest.mark.slow

TOKEN = "a-token-long-enough-for-the-file"
#: Resident memory after an attack may be at most this many times the warm figure.
RSS_GROWTH = 1.2


def make_net() -> EarlyExitNet:
    net = digits_net()
    net.set_policy(ExitPolicy(temperatures=(1.0,) * net.num_exits, thresholds=(2.0,) * len(net.exit_cuts)))
    return net


def cluster(**data_plane: object) -> ClusterSpec:
    return ClusterSpec.model_validate({
        "nodes": [{"name": "edge", "role": "edge", "ends_at": make_net().exit_cuts[0].id},
                  {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}],
        "security": {"token": TOKEN}, "data_plane": data_plane})


class Chain:
    """cloud1 serving its stage, and what a good batch for it is and should get."""

    def __init__(self, net: EarlyExitNet, spec: ClusterSpec, version: int, service: DataService):
        self.net, self.spec, self.version, self.service = net, spec, version, service
        self.address = spec.node("cloud1").address or ""
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.activation = net.graph.segment(MODEL_INPUT, net.exit_cuts[0].id)(x)
        self.expected = net.infer(x).prediction.tolist()

    def good(self, ids: list[int], trace: list | None = None) -> tuple[bytes, list]:
        return batch_frame(self.version, ids, encode_tensors(self.activation, parse_codec("raw")),
                           trace or [("edge", "sent", 1.0)])

    async def answers(self, ids: list[int]) -> list[int]:
        """Send a good batch on a fresh connection; the predictions that come back, in id order."""
        connection, welcome = await data_connection(self.address, TOKEN)
        assert welcome is not None and welcome.kind is FrameType.WELCOME
        metadata, payload = self.good(ids)
        await connection.send(FrameType.BATCH, metadata, payload, batch_id=1)
        got: dict[int, int] = {}
        while len(got) < len(ids):
            frame = await asyncio.wait_for(connection.receive(), 10)
            if frame.kind is FrameType.RESULTS:
                for outcome in decode_results(frame.metadata, "test"):
                    got[outcome.request_id] = getattr(outcome, "prediction", -1)
        held = len(self.service._connections)
        await connection.close()
        for _ in range(100):  # until the node has let go of it, so counts taken next do not include it
            if len(self.service._connections) < held:
                break
            await asyncio.sleep(0.05)
        return [got[i] for i in ids]

    async def health_s(self) -> float:
        started = time.perf_counter()
        async with grpc.aio.insecure_channel(self.address) as channel:
            await wire_pb2_grpc.StageServiceStub(channel).Health(
                wire_pb2.HealthRequest(), metadata=token_metadata(TOKEN), timeout=5)
        return time.perf_counter() - started


def attack(spec: ClusterSpec, tmp_path: Path, scenario) -> object:  # noqa: ANN001 - async (Chain) -> object
    net = make_net()

    async def run() -> object:
        nodes = await start_nodes(spec, tmp_path)
        entry = Entry(net, spec)
        try:
            await entry.start()
            chain = Chain(net, spec, entry.placement.version, nodes[0].data)
            assert await chain.answers([1, 2]) == chain.expected  # warm: the stage has run, buffers exist
            warm = rss_kib(os.getpid())
            outcome = await scenario(chain)
            gc.collect()
            final = rss_kib(os.getpid())
            assert final <= warm * RSS_GROWTH, f"RSS grew from {warm} KiB warm to {final} KiB after the attack"
            print(f"RSS warm {warm} KiB, after the attack {final} KiB ({final / warm:.3f}x)")
            return outcome
        finally:
            await entry.close()
            await stop_nodes(nodes)

    return asyncio.run(run())


def test_a_trace_bomb_is_refused_and_the_node_keeps_serving(tmp_path: Path) -> None:
    async def scenario(chain: Chain) -> tuple[str, str, float, list[int]]:
        long, welcome = await data_connection(chain.address, TOKEN)
        metadata, payload = chain.good([7, 8], trace=[("edge", "e", 1.0)] * 10)
        header = wire_pb2.BatchHeader.FromString(metadata)
        header.trace.extend([wire_pb2.Stamp(node="n", event="e")] * 100)  # over 64 stamps, under 192 KiB
        await long.send(FrameType.BATCH, header.SerializeToString(), payload, batch_id=1)
        frame = await asyncio.wait_for(long.receive(), 10)
        (refusal, *_) = decode_results(frame.metadata, "test")
        huge, _ = await data_connection(chain.address, TOKEN)
        header.trace.extend([wire_pb2.Stamp(node="n" * 60, event="e" * 60)] * 100_000)  # megabytes of trace
        await huge.send(FrameType.BATCH, header.SerializeToString(), payload, batch_id=1)
        try:
            await asyncio.wait_for(huge.receive(), 10)
            closed = "answered"
        except ConnectionError:
            closed = "closed"
        except Exception as exc:  # noqa: BLE001 - the reader's WireError for the cut-off stream
            closed = f"closed ({type(exc).__name__})"
        return getattr(refusal, "code", "?"), closed, await chain.health_s(), await chain.answers([9, 10])

    code, huge, health, answers = attack(cluster(), tmp_path, scenario)  # type: ignore[misc]
    assert code == "bad_message"
    assert huge.startswith("closed")
    assert health < 1.0
    assert answers is not None


def test_two_senders_reusing_one_request_id_each_get_their_own_answer(tmp_path: Path) -> None:
    async def scenario(chain: Chain) -> tuple[list[int], list[int], list[int]]:
        first, second = await asyncio.gather(chain.answers([5, 6]), chain.answers([5, 6]))
        return first, second, chain.expected

    first, second, expected = attack(cluster(), tmp_path, scenario)  # type: ignore[misc]
    assert first == second == expected


def test_connections_that_never_read_do_not_stop_the_node(tmp_path: Path) -> None:
    async def scenario(chain: Chain) -> tuple[float, list[int], list[int]]:
        silent = []
        for _ in range(8):  # each sends its whole credit of batches and never reads a byte
            connection, welcome = await data_connection(chain.address, TOKEN)
            assert welcome is not None
            credits = wire_pb2.Welcome.FromString(welcome.metadata).credits
            connection.transport.pause_reading()  # type: ignore[union-attr]
            for batch_id in range(1, credits + 1):
                metadata, payload = chain.good([batch_id * 2, batch_id * 2 + 1])
                await connection.send(FrameType.BATCH, metadata, payload, batch_id=batch_id)
            silent.append(connection)
        await asyncio.sleep(0.5)
        health = await chain.health_s()
        answers = await chain.answers([1, 2])
        for connection in silent:
            await connection.close()
        return health, answers, chain.expected

    health, answers, expected = attack(cluster(), tmp_path, scenario)  # type: ignore[misc]
    assert health < 1.0
    assert answers == expected


def test_two_thousand_silent_connections_are_bounded_and_closed(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))

    async def scenario(chain: Chain) -> tuple[dict[str, int], int, int, float, list[int], list[int]]:
        held: list[int] = []

        async def watch() -> None:  # what the node holds, sampled while the connections pile in
            while True:
                held.append(len(chain.service._connections))
                await asyncio.sleep(0.01)

        serving = len(chain.service._connections)  # the edge's own connection, if it has opened one
        watcher = asyncio.get_running_loop().create_task(watch())
        host, port = chain.address.rpartition(":")[0], await _port(chain)
        opened = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(2000)),
                                      return_exceptions=True)
        streams = [o for o in opened if not isinstance(o, BaseException)]
        health = await chain.health_s()
        # A connection the kernel completed but the listener never took (its accept queue overflowed) is
        # never told anything; every one the node took is told, sooner (busy) or after the hello timeout.
        told = await asyncio.gather(*(_told(reader) for reader, _ in streams))
        outcome = {key: told.count(key) for key in ("busy", "hello_timeout", "untold", "other")}
        for _, writer in streams:
            writer.close()
        for _ in range(50):  # late arrivals from the accept queue go within one hello timeout
            if len(chain.service._connections) <= serving:
                break
            await asyncio.sleep(0.1)
        watcher.cancel()
        return outcome, max(held), len(chain.service._connections) - serving, health, await chain.answers([3, 4]), \
            chain.expected

    outcome, most_held, left, health, answers, expected = attack(  # type: ignore[misc]
        cluster(max_connections=64, hello_timeout="500ms"), tmp_path, scenario)
    assert sum(outcome.values()) > 1000, outcome  # most of the 2,000 opened
    assert outcome["busy"] > 0 and outcome["hello_timeout"] > 0 and outcome["other"] == 0, outcome
    assert most_held <= 64, most_held
    assert left == 0
    assert health < 1.0
    assert answers == expected


async def _port(chain: Chain) -> int:
    from support import data_port

    return await data_port(chain.address, TOKEN)


async def _told(reader: asyncio.StreamReader) -> str:
    try:
        data = await asyncio.wait_for(reader.read(4096), 20)
    except TimeoutError:
        return "untold"
    except ConnectionError:
        return "other"
    return "busy" if b"busy" in data else "hello_timeout" if b"hello_timeout" in data else "other"
