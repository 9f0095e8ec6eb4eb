"""The coordinator on a fake clock: when it re-reads the registry, how long it leaves a failing node out,
how long it waits for the tiers at start; and its CPU work (placer, stage files) leaves the event loop free.

Real objects throughout: the embedded registry (on the fake clock), real nodes in this process reached
through the in-process control twin, and a real model. Only time is faked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from fake_clock import FakeClock
from splitexit import EarlyExitNet, build_model
from splitexit.config import ClusterSpec, ModelSource, NodeSpec
from splitexit.config.codec_names import CodecSpec
from splitexit.control.coordinator import RESYNC_INTERVAL, SETTLE, START_HINT_AFTER, START_POLL, Coordinator
from splitexit.control.embedded_registry import EmbeddedRegistry
from splitexit.control.members import NODES, SPEED_SECONDS, NodeInfo, describe_node
from splitexit.errors import ClusterError
from splitexit.runtime.failover import BAN
from splitexit.runtime.local_control import LocalNodeControl
from splitexit.runtime.node import Node
from splitexit.runtime.placement import Placement, default_placement

CLUSTER = """
nodes:
  - {name: edge, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
  - {name: cloud1b, address: "127.0.0.1:50063", tier: 1}
"""
ONE_WORKER = """
nodes:
  - {name: edge, role: edge}
  - {name: cloud1, address: "127.0.0.1:50061"}
"""
#: Registration TTLs: one that outlives every test, one that runs out before the first re-read.
LONG_TTL, SHORT_TTL = 600.0, 1.5
#: Real seconds a test waits for something the coordinator is about to do.
PATIENCE = 20.0
#: Classes of the wide model: its stage files take long enough to build that an event loop blocked by one shows.
WIDE_CLASSES = 64_000
#: Seconds between ticks of the task that shows whether the loop is free.
TICK = 0.002


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait (real time) for ``condition``: the coordinator's work runs in threads."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class InlineExecutor(Executor):
    """Runs each job at once, on the caller's thread: on the fake clock a re-plan then happens at the fake
    second it starts, not whenever a real thread gets to it."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future[object] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, as a pool would
            future.set_exception(exc)
        return future


@dataclass
class Installed:
    """A plan the coordinator handed the edge, and when (fake seconds)."""

    at: float
    placement: Placement
    peers: list[str]


class Directory(dict[str, Node]):
    """The nodes that run in this process, by name; records each lookup (a control call) with its time."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock
        self.calls: list[tuple[float, str]] = []

    def get(self, name: str, default: Node | None = None) -> Node | None:  # type: ignore[override]  # logs too
        self.calls.append((self.clock(), name))
        return super().get(name, default)


@dataclass
class Harness:
    root: Path
    cluster: ClusterSpec
    clock: FakeClock
    registry: EmbeddedRegistry
    nodes: Directory
    coordinator: Coordinator
    installed: list[Installed] = field(default_factory=list)

    def peers(self) -> list[str]:
        return self.installed[-1].peers if self.installed else []

    async def register(self, name: str, ttl: float = LONG_TTL) -> None:
        lease = await self.registry.grant(ttl)
        info = NodeInfo(name=name, address=self.cluster.node(name).address or "", tier=1)
        await self.registry.put(NODES + name, info.to_bytes(), lease=lease)


def cluster() -> ClusterSpec:
    return ClusterSpec.model_validate(yaml.safe_load(CLUSTER))


@pytest.fixture(scope="module")
def net() -> EarlyExitNet:
    torch.manual_seed(0)
    return EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                   source=ModelSource(name="digits_cnn", num_classes=10)).eval()


async def with_coordinator(net: EarlyExitNet, tmp_path: Path, running: tuple[str, ...],
                           scenario: Callable[[Harness], Awaitable[None]]) -> None:
    spec = cluster()
    clock = FakeClock()
    registry = EmbeddedRegistry(clock=clock)  # not started: leases expire when someone reads, as with etcd's view
    nodes = Directory(clock)
    for name in running:
        nodes[name] = Node(spec, name, cache_dir=tmp_path / name)
    harness: Harness

    async def on_plan(placement: Placement, peers: list[NodeSpec], codec: CodecSpec | None) -> None:
        harness.installed.append(Installed(clock(), placement, [p.name for p in peers]))

    coordinator = Coordinator(net, spec, registry, on_plan, connect=lambda node: LocalNodeControl(node, nodes),
                              clock=clock, sleep=clock.sleep, executor=InlineExecutor())
    harness = Harness(tmp_path, spec, clock, registry, nodes, coordinator)
    try:
        await scenario(harness)
    finally:
        await coordinator.close()
        for node in list(dict.values(nodes)):
            await node.stop(grace=0)


def test_a_lapsed_registration_is_seen_at_the_next_re_read_not_before(net: EarlyExitNet, tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.register("cloud1")
        await h.register("cloud1b", ttl=SHORT_TTL)
        await h.coordinator.start()
        assert h.peers() == ["cloud1", "cloud1b"] and h.installed[-1].at == 0.0
        assert sorted(n for n, _, _ in h.coordinator.shipments) == ["cloud1", "cloud1b"], "each got the stage file"
        await h.clock.advance(RESYNC_INTERVAL - 0.1)  # cloud1b's lease ran out, but nobody has read since
        assert h.peers() == ["cloud1", "cloud1b"]
        await h.clock.advance(0.1 + SETTLE)  # the re-read: the registry expires the lease, the coordinator sees it
        await eventually(lambda: h.peers() == ["cloud1"], "a plan without cloud1b")
        assert h.installed[-1].at == pytest.approx(RESYNC_INTERVAL + SETTLE)
        assert [(m.node, m.event) for m in h.coordinator.membership] == [("cloud1b", "left")]
        assert [c.cause for c in h.coordinator.changes] == ["start", "membership"]
        await h.register("cloud1b")
        await h.clock.advance(SETTLE)
        await eventually(lambda: h.peers() == ["cloud1", "cloud1b"], "cloud1b back")
        assert [(m.node, m.event) for m in h.coordinator.membership] == [("cloud1b", "left"), ("cloud1b", "joined")]

    asyncio.run(with_coordinator(net, tmp_path, ("cloud1", "cloud1b"), scenario))


def test_a_broken_node_is_left_out_until_a_re_read_after_its_ban(net: EarlyExitNet, tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.register("cloud1")
        await h.register("cloud1b")
        await h.coordinator.start()
        h.coordinator.node_broke("cloud1b")
        assert h.coordinator.bans.banned("cloud1b")
        assert [(m.node, m.event) for m in h.coordinator.membership] == [("cloud1b", "broke")]
        await h.clock.advance(SETTLE)
        await eventually(lambda: h.peers() == ["cloud1"], "a plan without the broken node")
        await h.clock.advance(RESYNC_INTERVAL - SETTLE - 0.1)  # the ban (1 s) is over, no re-read yet
        assert not h.coordinator.bans.banned("cloud1b") and h.peers() == ["cloud1"]
        await h.clock.advance(0.1 + SETTLE)  # the re-read finds the ban over
        await eventually(lambda: h.peers() == ["cloud1", "cloud1b"], "cloud1b back after its ban")
        assert h.installed[-1].at == pytest.approx(RESYNC_INTERVAL + SETTLE)

    asyncio.run(with_coordinator(net, tmp_path, ("cloud1", "cloud1b"), scenario))


def test_an_unreachable_node_is_retried_with_a_growing_back_off(net: EarlyExitNet, tmp_path: Path) -> None:
    """cloud1b is registered but does not answer: tried at start, at the first re-read after each ban (1 s,
    2 s, 4 s), and in as soon as it answers."""

    async def rounds(h: Harness, count: int) -> None:
        for _ in range(count):
            await h.clock.advance(RESYNC_INTERVAL + SETTLE)  # a re-read, and a re-plan it may ask for
            await eventually(lambda: not h.coordinator.busy, "the re-plan to finish (it works in real threads)")

    async def scenario(h: Harness) -> None:
        await h.register("cloud1")
        await h.register("cloud1b")
        await h.coordinator.start()
        assert h.peers() == ["cloud1"], "the unreachable replica is left out at once"
        await rounds(h, 3)
        tries = [t for t, name in h.nodes.calls if name == "cloud1b"]
        # banned 1 s at 0: tried at the re-read at 2 s; banned 2 s then: still out at 4 s, tried at 6 s
        assert tries == pytest.approx([0.0, RESYNC_INTERVAL + SETTLE, 3 * RESYNC_INTERVAL + SETTLE])
        assert [BAN.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
        h.nodes["cloud1b"] = Node(h.cluster, "cloud1b", cache_dir=h.root / "cloud1b")
        await rounds(h, 2)  # banned 4 s at 6.05: still out at 8 s and 10 s
        assert h.peers() == ["cloud1"]
        await rounds(h, 1)
        await eventually(lambda: h.peers() == ["cloud1", "cloud1b"], "cloud1b in once it answers")
        fourth = [t for t, name in h.nodes.calls if name == "cloud1b"][len(tries)]
        assert fourth == pytest.approx(6 * RESYNC_INTERVAL + SETTLE), "tried first at the re-read after 10.05 s"

    asyncio.run(with_coordinator(net, tmp_path, ("cloud1",), scenario))


def test_start_waits_for_every_tier_then_gives_up_with_a_hint(net: EarlyExitNet, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    async def late_node(h: Harness) -> None:
        starting = asyncio.get_running_loop().create_task(h.coordinator.start(wait=30.0))
        await h.clock.advance(5.0)
        assert not starting.done()
        await h.register("cloud1")
        await h.clock.advance(START_POLL)
        await eventually(starting.done, "start to place the chain")
        starting.result()
        assert h.peers() == ["cloud1"]

    async def no_node(h: Harness) -> None:
        caplog.clear()  # late_node waited past the hint too
        starting = asyncio.get_running_loop().create_task(h.coordinator.start(wait=30.0))
        await h.clock.advance(START_HINT_AFTER + START_POLL)  # the edge says what it waits for, and waits on
        hints = [r.getMessage() for r in caplog.records if "waiting for tier 1" in r.getMessage()]
        assert len(hints) == 1 and "cloud1 at 127.0.0.1:" in hints[0] and "splitexit up" in hints[0], hints
        await h.clock.advance(30.0 - START_HINT_AFTER - 2 * START_POLL)
        assert not starting.done()
        await h.clock.advance(2 * START_POLL)
        await eventually(starting.done, "start to give up")
        with pytest.raises(ClusterError, match="no node of tier 1: cloud1, cloud1b is up after 30 s"):
            starting.result()

    asyncio.run(with_coordinator(net, tmp_path / "late", ("cloud1",), late_node))
    asyncio.run(with_coordinator(net, tmp_path / "none", (), no_node))


# --------------------------------------------------------------------------- the loop stays free
class RecordingExecutor(ThreadPoolExecutor):
    """A thread pool that notes when each job it was handed started and ended."""

    def __init__(self, max_workers: int):
        super().__init__(max_workers=max_workers)
        self.jobs: list[tuple[float, float]] = []

    def submit(self, fn, /, *args, **kwargs):
        def timed() -> object:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.jobs.append((started, time.perf_counter()))
        return super().submit(timed)


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _ticker(ticks: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(TICK)
        ticks.append(time.perf_counter())


def test_the_loop_keeps_ticking_while_a_stage_file_builds_and_a_node_describes_itself(tmp_path: Path) -> None:
    """And the placer (planning, when the planner decides) is called in the executor too."""
    torch.manual_seed(0)
    wide = EarlyExitNet.from_model(build_model("digits_cnn", WIDE_CLASSES), torch.zeros(1, 1, 8, 8),
                                   source=ModelSource(name="digits_cnn", num_classes=WIDE_CLASSES)).eval()
    spec = ClusterSpec.model_validate(yaml.safe_load(ONE_WORKER))
    executor, describing = RecordingExecutor(max_workers=1), RecordingExecutor(max_workers=1)
    placer_threads: list[bool] = []  # per placer call: whether an event loop ran in the thread that made it

    async def go() -> tuple[list[float], tuple[float, float]]:
        registry = EmbeddedRegistry()
        lease = await registry.grant(LONG_TTL)
        await registry.put(NODES + "cloud1", NodeInfo(name="cloud1", address="127.0.0.1:50061", tier=1).to_bytes(),
                           lease=lease)
        nodes = {"cloud1": Node(spec, "cloud1", cache_dir=tmp_path / "cloud1")}

        async def on_plan(placement: Placement, peers: list[NodeSpec], codec: CodecSpec | None) -> None:
            pass

        def placer(live_cluster: ClusterSpec, live: set[str]) -> Placement:
            placer_threads.append(_has_running_loop())
            return default_placement(wide, live_cluster, live)

        coordinator = Coordinator(wide, spec, registry, on_plan, connect=lambda node: LocalNodeControl(node, nodes),
                                  placer=placer, executor=executor)
        ticks: list[float] = []
        stop = asyncio.Event()
        ticking = asyncio.get_running_loop().create_task(_ticker(ticks, stop))
        window: list[float] = []

        async def describe() -> None:
            window.append(time.perf_counter())
            await describe_node("cloud1", "127.0.0.1:50061", 1, "x", executor=describing)
            window.append(time.perf_counter())

        try:
            await asyncio.sleep(TICK * 5)
            await asyncio.gather(coordinator.start(), describe())
            await asyncio.sleep(TICK * 5)
        finally:
            stop.set()
            await ticking
            await coordinator.close()
            await nodes["cloud1"].stop(grace=0)
        return ticks, (window[0], window[1])

    try:
        ticks, (described_from, described_to) = asyncio.run(go())
    finally:
        executor.shutdown()
        describing.shutdown()
    assert placer_threads == [False], "the coordinator called its placer once, in its executor, not on the loop"
    assert executor.jobs, "the coordinator built the worker's stage file in its executor, not on the loop"
    build_from, build_to = max(executor.jobs, key=lambda job: job[1] - job[0])
    assert [t for t in ticks if build_from < t < build_to], "the loop ticked while the stage file built"
    (speed_from, speed_to), = describing.jobs
    assert described_from < speed_from and speed_to < described_to, "describe_node measured in its executor"
    assert speed_to - speed_from >= SPEED_SECONDS
    assert [t for t in ticks if speed_from < t < speed_to], "the loop ticked while the machine's speed was measured"
