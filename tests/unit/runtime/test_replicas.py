"""The replicas of the next stage on a fake clock: the least loaded replica gets each batch (ties in turn),
a replica that refuses is retried with doubling waits up to the cap, and a broken stream is reconnected."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from fake_clock import FakeClock, settle
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.errors import NodeUnavailableError
from splitexit.runtime.control_messages import LinkHealth, NodeHealth
from splitexit.runtime.hop import RowError, Stamp
from splitexit.runtime.meter import ThroughputMeter
from splitexit.runtime.remote import LinkCounters
from splitexit.runtime.replicas import RECONNECT, ReplicaSet

CLUSTER = ClusterSpec.model_validate(yaml.safe_load("""
nodes:
  - {name: edge, role: edge}
  - {name: a, address: "127.0.0.1:50061"}
  - {name: b, address: "127.0.0.1:50062", tier: 1}
  - {name: c, address: "127.0.0.1:50063", tier: 1}
"""))
PEERS = {name: CLUSTER.node(name) for name in ("a", "b", "c")}


class FakeReplica:
    """A stream to one replica: it refuses to connect while its name is in ``network.down``."""

    def __init__(self, network: FakeNetwork, peer: NodeSpec) -> None:
        self.network, self.name = network, peer.name
        self.meter = ThroughputMeter()
        self.waiting = 0  # rows "sent and not answered" as the test sets them
        self.batches: list[list[int]] = []
        self._broken: str | None = None
        self._broken_event = asyncio.Event()

    @property
    def broken(self) -> str | None:
        return self._broken

    @property
    def outstanding(self) -> int:
        return self.waiting

    @property
    def credits(self) -> int:
        return self.network.credits.get(self.name, 1)

    async def connect(self, timeout: float) -> None:
        if self.name in self.network.down:
            raise NodeUnavailableError(f"node {self.name} is down (test)")

    async def send(self, ids: Sequence[int], tensors: Any, trace: list[Stamp]) -> list[asyncio.Future]:
        self.batches.append(list(ids))
        self.network.targets.append(self.name)
        return [asyncio.get_running_loop().create_future() for _ in ids]

    def break_stream(self, reason: str) -> None:
        self._broken = reason
        self._broken_event.set()

    async def wait_broken(self) -> None:
        await self._broken_event.wait()

    async def health(self) -> NodeHealth:
        if not self.network.reports:
            raise NodeUnavailableError("no health in this test")
        return NodeHealth(self.name, True, 1, 1, 0, 0, (), "", "", tuple(self.network.reports.get(self.name, ())))

    async def close(self) -> None:
        if self._broken is None:
            self.break_stream("closed")


class FakeNetwork:
    """Opens :class:`FakeReplica` streams and remembers them, and where each batch went."""

    def __init__(self, down: set[str] | None = None) -> None:
        self.down = down or set()
        self.opened: dict[str, list[FakeReplica]] = {}
        self.targets: list[str] = []
        self.reports: dict[str, list[LinkHealth]] = {}  # the links each replica's Health reports
        self.credits: dict[str, int] = {}  # batches each replica would take now (default 1)

    def open(self, peer: NodeSpec, counters: LinkCounters) -> FakeReplica:
        replica = FakeReplica(self, peer)
        self.opened.setdefault(peer.name, []).append(replica)
        return replica

    def latest(self, name: str) -> FakeReplica:
        return self.opened[name][-1]


def replica_set(network: FakeNetwork, clock: FakeClock, broke: list[str] | None = None) -> ReplicaSet:
    return ReplicaSet(sender="edge", cluster=CLUSTER, plan_version=1, open_replica=network.open, sleep=clock.sleep,
                      on_broken=broke.append if broke is not None else None)


def test_each_batch_goes_to_the_replica_with_the_fewest_outstanding_rows() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update(list(PEERS.values()))
        assert sorted(replicas.live) == ["a", "b", "c"]
        network.latest("a").waiting, network.latest("b").waiting, network.latest("c").waiting = 3, 0, 1
        for _ in range(3):
            await replicas.send([1], None, [])
        assert network.targets == ["b", "b", "b"], "the least loaded one, as long as it stays least loaded"
        await replicas.close()

    asyncio.run(main())


def test_a_replica_without_credit_is_passed_over_while_another_has_some() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update(list(PEERS.values()))
        network.latest("a").waiting, network.latest("b").waiting, network.latest("c").waiting = 0, 2, 1
        network.credits["a"] = 0  # the least loaded, but its node has granted nothing more
        for _ in range(2):
            await replicas.send([1], None, [])
        assert network.targets == ["c", "c"], "the least loaded of those that would take the batch now"
        network.credits = {"a": 0, "b": 0, "c": 0}
        await replicas.send([1], None, [])
        assert network.targets[-1] == "a", "none has credit: the least loaded, as before"
        await replicas.close()

    asyncio.run(main())


def test_ties_go_round_in_turn() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update(list(PEERS.values()))
        for request_id in range(6):
            await replicas.send([request_id], None, [])
        first_round = network.targets[:3]
        assert sorted(first_round) == ["a", "b", "c"] and network.targets[3:] == first_round
        network.latest(first_round[0]).waiting = 1  # one is busier now: the other two alternate
        network.targets.clear()
        for request_id in range(4):
            await replicas.send([request_id], None, [])
        assert first_round[0] not in network.targets and len(set(network.targets)) == 2
        assert network.targets[0] != network.targets[1] and network.targets[:2] == network.targets[2:]
        await replicas.close()

    asyncio.run(main())


def test_with_no_live_replica_a_batch_fails_at_once_with_no_route() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(down={"a"}), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update([PEERS["a"]])  # returns once the first attempt failed
        (future,) = await replicas.send([7], None, [])
        outcome = future.result()
        assert isinstance(outcome, RowError) and outcome.code == "no_route" and "(a)" in outcome.message
        await replicas.close()

    asyncio.run(main())


def test_a_replica_that_refuses_is_retried_with_doubling_waits_up_to_the_cap_then_used() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(down={"a"}), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update([PEERS["a"]])
        expected = [RECONNECT.delay(n) for n in range(1, 9)]
        assert expected == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        for waited in range(1, len(expected)):
            await clock.advance(expected[waited - 1])
            assert clock.slept == expected[:waited + 1] and replicas.live == []
        network.down.clear()
        await clock.advance(expected[-1])
        assert replicas.live == ["a"] and len(network.opened["a"]) == len(expected) + 1
        await replicas.send([1], None, [])
        assert network.targets == ["a"]
        await replicas.close()

    asyncio.run(main())


def test_a_broken_stream_is_reported_and_reconnected_after_the_first_wait() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(), FakeClock()
        broke: list[str] = []
        replicas = replica_set(network, clock, broke)
        await replicas.update([PEERS["a"]])
        first = network.latest("a")
        first.break_stream("the stream to a broke (test)")
        await settle()
        assert broke == ["a"] and replicas.live == [] and clock.slept == [RECONNECT.first]
        await clock.advance(RECONNECT.first - 0.01)
        assert replicas.live == [], "not before its back-off"
        await clock.advance(0.01)
        assert replicas.live == ["a"] and network.latest("a") is not first
        await replicas.close()

    asyncio.run(main())


def test_a_peer_announced_again_is_retried_at_once() -> None:
    async def main() -> None:
        network, clock = FakeNetwork(down={"a"}), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update([PEERS["a"]])
        await clock.advance(RECONNECT.delay(1) + RECONNECT.delay(2))  # waiting RECONNECT.delay(3) now
        network.down.clear()
        await replicas.update([PEERS["a"]])  # the coordinator names it again (it restarted)
        await settle()
        assert replicas.live == ["a"], "without waiting out the rest of its back-off"
        await replicas.close()

    asyncio.run(main())


@pytest.mark.parametrize("gone", ["a", "b"])
def test_a_peer_that_leaves_is_closed_and_no_longer_chosen(gone: str) -> None:
    async def main() -> None:
        network, clock = FakeNetwork(), FakeClock()
        replicas = replica_set(network, clock)
        await replicas.update([PEERS["a"], PEERS["b"]])
        await replicas.update([PEERS[name] for name in ("a", "b") if name != gone])
        assert network.latest(gone).broken == "closed" and gone not in replicas.live
        for request_id in range(3):
            await replicas.send([request_id], None, [])
        assert gone not in network.targets
        await replicas.close()

    asyncio.run(main())


def report(source: str, target: str, bandwidth: float) -> LinkHealth:
    return LinkHealth(source, target, raw_bytes=1, wire_bytes=1, messages=1, rows=1, bandwidth_bps=bandwidth)


def test_a_replica_reports_only_links_downstream_of_it() -> None:
    """Replica ``a`` reports its own link and the next one after it, which are kept, and also the edge's link
    to it, a link from ``b`` and one from a node nobody sends to, which would let it steer re-planning."""
    async def main() -> dict:
        network, clock = FakeNetwork(), FakeClock()
        network.reports["a"] = [report("a", "z", 8e6), report("z", "y", 7e6), report("edge", "a", 1.0),
                                report("b", "z", 1.0), report("q", "r", 1.0)]
        replicas = replica_set(network, clock)
        await replicas.update([PEERS["a"]])
        replicas.counters.setdefault("a", LinkCounters())
        try:
            return await replicas.health_links()
        finally:
            await replicas.close()

    links = asyncio.run(main())
    assert sorted(links) == [("a", "z"), ("edge", "a"), ("z", "y")]
    assert links[("a", "z")].bandwidth == 8e6 and links[("z", "y")].bandwidth == 7e6
    assert links[("edge", "a")].bandwidth != 1.0, "the edge's own link keeps the edge's own figure"
