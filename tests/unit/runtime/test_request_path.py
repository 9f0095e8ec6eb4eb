"""The edge's request path in one process: resubmission, late duplicates dropped, and a plan switch.

The edge's hop is the real one (``stage_hop``: its stage, its raw codec); only the streams to the next
stage's replicas are replaced by :class:`ChannelTwin`, an in-memory channel that decodes what the edge
encoded and hands it to the rest of the chain, a real :class:`Hop`. Like the gRPC stream it stands in for,
the twin keeps one pending future per request id and drops an answer for an id it no longer waits for; it
can lose sends (``node_unavailable``), hold answers back, and fail what it holds.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import torch
import yaml

from splitexit import EarlyExitNet, build_model
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.codec_names import parse_codec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT
from splitexit.errors import ConfigError
from splitexit.runtime.executor import StageExecutor
from splitexit.runtime.hop import Hop, RowError, Stamp
from splitexit.runtime.placement import PlacedStage, Placement, default_placement, versioned
from splitexit.runtime.records import RequestRecord
from splitexit.runtime.request_path import RequestPath
from splitexit.wire.tensor_codec import decode

T = TypeVar("T")
#: What the event loop reported instead of logging it (see `run`).
LoopErrors = list[dict[str, Any]]
RAW = parse_codec("raw")
#: Seconds a test waits for something that should happen at once (a retired hop closing, a send).
SOON = 5.0


def make_cluster(timeout: str = "60s", attempt_timeout: str = "10s") -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(f"""
nodes:
  - {{name: edge, role: edge}}
  - {{name: cloud, address: "127.0.0.1:50061"}}
batching: {{max_batch: 4, max_wait: 1ms}}
retry: {{first_wait: 5ms, max_wait: 20ms, timeout: {timeout}, attempt_timeout: {attempt_timeout}}}
"""))


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    """Uncalibrated: every row runs to the final exit, so every request crosses the edge's link."""
    torch.manual_seed(0)
    return EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8)).eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@dataclass
class Wiring:
    """What each plan's channel leads to, and every channel the edge opened, in order."""

    net: EarlyExitNet
    onward: dict[int, PlacedStage] = field(default_factory=dict)  # plan version -> the next stage
    fail_first: dict[int, int] = field(default_factory=dict)  # plan version -> sends lost before one goes through
    late: dict[int, int] = field(default_factory=dict)  # plan version -> sends that also arrive, late
    channels: list[ChannelTwin] = field(default_factory=list)

    def plan(self, placement: Placement) -> Placement:
        self.onward[placement.version] = placement.stages[1]
        return placement

    def channel(self, version: int) -> ChannelTwin:
        (channel,) = [c for c in self.channels if c.plan_version == version]
        return channel


class ChannelTwin:
    """In-memory twin of the edge's streams to the next stage (a ReplicaSet): see the module docstring."""

    def __init__(self, wiring: Wiring, *, sender: str, cluster: ClusterSpec, plan_version: int,
                 **_: object):
        self.sender, self.plan_version = sender, plan_version
        stage = wiring.onward[plan_version]
        self.stage = wiring.net.stage(stage.start, stage.end)
        self.onward = Hop(stage.nodes[0], StageExecutor(self.stage, batching=cluster.batching), None)
        self.fail_first = wiring.fail_first.get(plan_version, 0)
        self.late = wiring.late.get(plan_version, 0)
        self.peers: list[str] = []
        self.sent: list[int] = []  # request ids, once per send
        self.dropped: list[int] = []  # answers that came for an id nobody waits for any more
        self.hold = asyncio.Event()  # answers wait for this once `holding` is set
        self.holding = False
        self.closed = False
        self._sends = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._late_release = asyncio.Event()
        wiring.channels.append(self)

    async def update(self, peers: Sequence[NodeSpec], *, wait: bool = True) -> None:
        self.peers = [p.name for p in peers]

    async def send(self, ids: Sequence[int], tensors: list, trace: list[Stamp]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ids]
        self._sends += 1
        self.sent.extend(ids)
        lost = self._sends <= self.fail_first
        late = self._sends <= self.late
        for request_id, future in zip(ids, futures):
            self._pending[request_id] = future
        if lost:
            self.fail(ids, "node_unavailable")
            if not late:
                return futures
        rows = len(ids)
        decoded = tuple(decode(m.header, m.payload, max_bytes=rows * info.bytes_per_sample,
                               expected=(info.dtype, info.shape))
                        for m, info in zip(tensors, self.stage.input_tensors))
        onward = await self.onward.send(list(ids), decoded, trace)
        for request_id, answer in zip(ids, onward):
            loop.create_task(self._deliver(request_id, answer, late=late))
        return futures

    async def _deliver(self, request_id: int, answer: asyncio.Future, *, late: bool) -> None:
        outcome = await answer
        if late:
            await self._late_release.wait()
        elif self.holding:
            await self.hold.wait()
        future = self._pending.get(request_id)
        if future is None or future.done():
            self.dropped.append(request_id)
            return
        del self._pending[request_id]
        future.set_result(outcome)

    def release_late(self) -> None:
        self._late_release.set()

    def fail(self, ids: Sequence[int], code: str) -> None:
        for request_id in ids:
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(RowError(request_id, code, "twin", "cloud"))

    @property
    def waiting(self) -> list[int]:
        return [i for i, f in self._pending.items() if not f.done()]

    async def health_links(self) -> dict:
        return {}

    async def close(self) -> None:
        self.closed = True
        self.fail(list(self._pending), "node_unavailable")
        await self.onward.close()


@pytest.fixture
def wiring(net: EarlyExitNet) -> Wiring:
    """Where each plan's ChannelTwin leads; :func:`request_path` opens them."""
    return Wiring(net)


def request_path(net: EarlyExitNet, cluster: ClusterSpec, wiring: Wiring, *, window: int) -> RequestPath:
    """The edge's request path, with a ChannelTwin where it would open gRPC streams."""
    return RequestPath(net, cluster, window=window, open_next=functools.partial(ChannelTwin, wiring))


@pytest.fixture
def loop_errors() -> LoopErrors:
    """Errors the event loop would only log (a future set twice, a task that died): the test asserts none."""
    return []


def run(scenario: Callable[[], Awaitable[T]], loop_errors: LoopErrors) -> T:
    """Run ``scenario`` on a fresh loop that records, instead of logging, the errors nobody awaited."""
    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: loop_errors.append(context))
        return await scenario()
    result = asyncio.run(main())
    assert not loop_errors, loop_errors
    return result


def expected(net: EarlyExitNet, x: torch.Tensor) -> list[int]:
    return net.infer(x).prediction.tolist()


def split_at(net: EarlyExitNet, cut: int) -> Placement:
    stages = (PlacedStage(0, ("edge",), MODEL_INPUT, cut), PlacedStage(1, ("cloud",), cut, MODEL_OUTPUT))
    return versioned(net, stages, label=f"split at {cut}")


async def until(condition: Callable[[], object], what: str) -> None:
    """Wait for ``condition()`` (polling); fail the test if it does not hold within SOON seconds."""
    deadline = asyncio.get_running_loop().time() + SOON
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_request_lost_with_a_node_is_sent_again_under_its_id_and_answered_once(
        net: EarlyExitNet, inputs: torch.Tensor, wiring: Wiring, loop_errors: LoopErrors) -> None:
    cluster = make_cluster()
    placement = wiring.plan(default_placement(net, cluster))
    wiring.fail_first[placement.version] = 2

    async def scenario() -> tuple[RequestPath, RequestRecord, list[RequestRecord]]:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [cluster.node("cloud")], RAW)
        try:
            first = await path.infer(inputs[0], index=0, label=7)
            rest = [await path.infer(x, index=i) for i, x in enumerate(inputs[1:4], start=1)]
        finally:
            await path.close()
        return path, first, rest

    path, first, rest = run(scenario, loop_errors)
    channel = wiring.channel(placement.version)
    assert channel.peers == ["cloud"]
    assert first.error is None and first.attempts == 3
    assert channel.sent[:3] == [first.request_id] * 3  # the same id each time
    assert first.prediction == expected(net, inputs[:1])[0] and first.label == 7 and first.index == 0
    assert first.node == "cloud" and first.exit == net.num_exits - 1
    assert [r.attempts for r in rest] == [1, 1, 1]
    assert [r.prediction for r in rest] == expected(net, inputs[1:4])
    assert len({first.request_id, *(r.request_id for r in rest)}) == 4
    assert channel.sent == [first.request_id] * 3 + [r.request_id for r in rest]
    assert channel.closed and not channel.dropped


def test_a_late_duplicate_answer_is_dropped(net: EarlyExitNet, inputs: torch.Tensor, wiring: Wiring,
                                            loop_errors: LoopErrors) -> None:
    """The first send is reported lost, but the node computed it anyway and its answer arrives after the
    resubmitted copy was answered: the request is answered once, by the resubmission."""
    cluster = make_cluster()
    placement = wiring.plan(default_placement(net, cluster))
    wiring.fail_first[placement.version] = 1
    wiring.late[placement.version] = 1
    answered: list = []

    async def scenario() -> tuple[RequestRecord, RequestRecord]:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [cluster.node("cloud")], RAW)
        channel = wiring.channel(placement.version)
        try:
            record = await path.infer(inputs[5])
            answered.append(record)
            channel.release_late()
            await until(lambda: channel.dropped, "the late answer")
            after = await path.infer(inputs[6])  # the path still serves, undisturbed
        finally:
            await path.close()
        return record, after

    record, after = run(scenario, loop_errors)
    channel = wiring.channel(placement.version)
    assert record.error is None and record.attempts == 2
    assert channel.sent[:2] == [record.request_id] * 2
    assert channel.dropped == [record.request_id]
    assert len(answered) == 1 and record.prediction == expected(net, inputs[5:6])[0]
    assert after.error is None and after.attempts == 1 and after.request_id != record.request_id
    assert after.prediction == expected(net, inputs[6:7])[0]


def test_a_failure_a_retry_cannot_fix_is_reported_at_once(net: EarlyExitNet, inputs: torch.Tensor,
                                                           wiring: Wiring, loop_errors: LoopErrors) -> None:
    cluster = make_cluster()
    placement = wiring.plan(default_placement(net, cluster))

    async def scenario() -> RequestRecord:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [], RAW)
        channel = wiring.channel(placement.version)
        channel.holding = True
        try:
            task = asyncio.get_running_loop().create_task(path.infer(inputs[0]))
            await until(lambda: channel.waiting, "the send")
            channel.fail(channel.waiting, "invalid_tensor")
            return await task
        finally:
            await path.close()

    record = run(scenario, loop_errors)
    assert record.attempts == 1 and record.prediction is None
    assert record.error is not None and record.error.startswith("invalid_tensor")


def test_resubmission_gives_up_after_the_retry_timeout(net: EarlyExitNet, inputs: torch.Tensor, wiring: Wiring,
                                                       loop_errors: LoopErrors) -> None:
    cluster = make_cluster(timeout="100ms")
    placement = wiring.plan(default_placement(net, cluster))
    wiring.fail_first[placement.version] = 10**6  # the node never comes back

    async def scenario() -> RequestRecord:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [], RAW)
        try:
            return await path.infer(inputs[0])
        finally:
            await path.close()

    record = run(scenario, loop_errors)
    assert record.error is not None and record.error.startswith("node_unavailable")
    assert record.attempts > 1 and record.latency_ms >= 100


def test_an_attempt_left_unanswered_is_sent_again_and_the_first_answer_wins(
        net: EarlyExitNet, inputs: torch.Tensor, wiring: Wiring, loop_errors: LoopErrors) -> None:
    """The node holds the first send (it stalled); after ``attempt_timeout`` the path sends again, the copy
    is answered, and the first send's answer, when it finally comes, is dropped."""
    cluster = make_cluster(attempt_timeout="300ms")
    placement = wiring.plan(default_placement(net, cluster))
    wiring.late[placement.version] = 1

    async def scenario() -> RequestRecord:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [cluster.node("cloud")], RAW)
        channel = wiring.channel(placement.version)
        try:
            record = await path.infer(inputs[2])
            channel.release_late()
            await until(lambda: channel.dropped, "the stalled send's answer")
        finally:
            await path.close()
        return record

    record = run(scenario, loop_errors)
    channel = wiring.channel(placement.version)
    assert record.error is None and record.attempts >= 2  # 2, unless a loaded machine made the copy late too
    assert record.prediction == expected(net, inputs[2:3])[0]
    assert channel.sent == [record.request_id] * record.attempts and record.request_id in channel.dropped


def test_a_request_nobody_answers_ends_with_deadline_exceeded(net: EarlyExitNet, inputs: torch.Tensor,
                                                               wiring: Wiring, loop_errors: LoopErrors) -> None:
    cluster = make_cluster(timeout="300ms", attempt_timeout="100ms")
    placement = wiring.plan(default_placement(net, cluster))

    async def scenario() -> RequestRecord:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [cluster.node("cloud")], RAW)
        wiring.channel(placement.version).holding = True  # answers wait for `hold`, which never comes
        try:
            return await asyncio.wait_for(path.infer(inputs[3]), SOON)
        finally:
            await path.close()

    record = run(scenario, loop_errors)
    assert record.error is not None and record.error.startswith("deadline_exceeded")
    assert "retry.timeout (0.3 s" in record.error
    assert record.attempts >= 2 and wiring.channel(placement.version).sent == [record.request_id] * record.attempts


def test_a_step_back_of_the_wall_clock_does_not_extend_the_deadline(
        net: EarlyExitNet, inputs: torch.Tensor, wiring: Wiring, loop_errors: LoopErrors,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock jumps back an hour mid-request (an NTP step): the request still ends at its timeout."""
    cluster = make_cluster(timeout="200ms")
    placement = wiring.plan(default_placement(net, cluster))
    wiring.fail_first[placement.version] = 10**6  # the node never comes back
    wall = time.time

    async def scenario() -> RequestRecord:
        path = request_path(net, cluster, wiring, window=4)
        await path.install(placement, [], RAW)
        reads = itertools.count()  # the first read (the request's start) is before the step, the rest after
        monkeypatch.setattr(time, "time", lambda: wall() - (3600 if next(reads) else 0))
        try:
            return await asyncio.wait_for(path.infer(inputs[4]), SOON)
        finally:
            monkeypatch.setattr(time, "time", wall)
            await path.close()

    record = run(scenario, loop_errors)
    assert record.error is not None and record.error.startswith("node_unavailable")
    assert 1 < record.attempts < 100  # a deadline read from the stepped wall clock would have ended at once


def test_a_plan_switch_answers_every_request_once_and_retires_the_old_hop_when_idle(
        net: EarlyExitNet, inputs: torch.Tensor, wiring: Wiring, loop_errors: LoopErrors) -> None:
    """Requests in flight when a new plan is installed finish on the old plan's hop, or (those a node that
    already switched refuses with ``unknown_plan``) are sent again along the new one; the old hop closes
    once its last request is answered, not before."""
    cluster = make_cluster()
    cuts = [c.id for c in net.exit_cuts]
    old, new = wiring.plan(split_at(net, cuts[0])), wiring.plan(split_at(net, cuts[-1]))
    assert old.version != new.version
    in_flight = 8

    async def scenario() -> tuple[list[RequestRecord], list[int], RequestRecord]:
        path = request_path(net, cluster, wiring, window=in_flight)
        await path.install(old, [cluster.node("cloud")], RAW)
        old_hop, old_channel = path.hop, wiring.channel(old.version)
        old_channel.holding = True  # answers wait until the switch is done
        try:
            tasks = [asyncio.get_running_loop().create_task(path.infer(inputs[i], index=i))
                     for i in range(in_flight)]
            await until(lambda: len(old_channel.waiting) == in_flight, "every request to reach the old plan")
            await path.install(new, [cluster.node("cloud")], RAW)
            assert path.hop is not old_hop
            refused = sorted(old_channel.waiting)[::2]
            old_channel.fail(refused, "unknown_plan")  # a node that switched already refuses these
            await asyncio.sleep(0.3)  # longer than the retiring hop's idle poll
            assert not old_channel.closed, "the old hop closed while requests were still on it"
            old_channel.hold.set()
            records = await asyncio.gather(*tasks)
            await until(lambda: old_channel.closed, "the old hop to close once idle")
            after = await path.infer(inputs[in_flight], index=in_flight)
        finally:
            await path.close()
        return records, refused, after

    records, refused, after = run(scenario, loop_errors)
    old_channel, new_channel = wiring.channel(old.version), wiring.channel(new.version)
    assert [r.index for r in records] == list(range(in_flight))
    assert all(r.error is None for r in records), [r.error for r in records if r.error]
    assert [r.prediction for r in records] == expected(net, inputs[:in_flight])
    assert len({r.request_id for r in records}) == in_flight
    assert sorted(new_channel.sent[:len(refused)]) == refused  # resent along the new plan, under the same ids
    assert {r.request_id: r.attempts for r in records} == {
        r.request_id: 2 if r.request_id in refused else 1 for r in records}
    assert sorted(old_channel.sent) == sorted(r.request_id for r in records)
    assert sorted(old_channel.dropped) == refused  # the old node's answers to refused rows come too late
    assert not new_channel.dropped
    assert after.error is None and new_channel.sent[-1] == after.request_id
    assert after.request_id not in old_channel.sent
    assert after.prediction == expected(net, inputs[in_flight:in_flight + 1])[0]


def test_installing_the_same_plan_again_only_updates_the_peers(net: EarlyExitNet, inputs: torch.Tensor,
                                                               wiring: Wiring, loop_errors: LoopErrors) -> None:
    cluster = make_cluster()
    placement = wiring.plan(default_placement(net, cluster))

    async def scenario() -> RequestRecord:
        path = request_path(net, cluster, wiring, window=2)
        await path.install(placement, [], RAW)
        hop = path.hop
        await path.install(placement, [cluster.node("cloud")], RAW)
        try:
            assert path.hop is hop
            return await path.infer(inputs[0])
        finally:
            await path.close()

    record = run(scenario, loop_errors)
    assert len(wiring.channels) == 1 and wiring.channels[0].peers == ["cloud"]
    assert record.error is None and record.prediction == expected(net, inputs[:1])[0]


def test_run_answers_a_dataset_in_order_through_a_flaky_channel(net: EarlyExitNet, inputs: torch.Tensor,
                                                                 wiring: Wiring, loop_errors: LoopErrors) -> None:
    cluster = make_cluster()
    placement = wiring.plan(default_placement(net, cluster))
    wiring.fail_first[placement.version] = 3
    labels = torch.arange(len(inputs)) % 10
    seen: list[int] = []

    async def scenario() -> list[RequestRecord]:
        path = request_path(net, cluster, wiring, window=3)
        await path.install(placement, [], RAW)
        try:
            dataset = list(zip(inputs, labels))
            return await path.run(dataset, on_record=lambda r: seen.append(r.index))  # type: ignore[arg-type]  # a list of pairs is a map-style dataset
        finally:
            await path.close()

    records = run(scenario, loop_errors)
    assert [r.index for r in records] == list(range(len(inputs))) and sorted(seen) == list(range(len(inputs)))
    assert [r.prediction for r in records] == expected(net, inputs)
    assert [r.label for r in records] == labels.tolist()
    assert all(r.error is None for r in records)
    assert sum(r.attempts - 1 for r in records) >= 3  # every lost send was made good
    assert len({r.request_id for r in records}) == len(inputs)


def test_infer_before_any_plan_or_with_a_wrong_shape_is_refused(net: EarlyExitNet, wiring: Wiring) -> None:
    cluster = make_cluster()

    async def scenario() -> None:
        path = request_path(net, cluster, wiring, window=1)
        with pytest.raises(RuntimeError, match="no plan is installed"):
            await path.infer(torch.zeros(1, 8, 8))
        await path.install(wiring.plan(default_placement(net, cluster)), [], RAW)
        try:
            with pytest.raises(ConfigError, match="one input of shape"):
                await path.infer(torch.zeros(2, 1, 8, 8))
        finally:
            await path.close()

    asyncio.run(scenario())

