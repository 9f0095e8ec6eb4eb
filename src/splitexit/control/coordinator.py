"""The coordinator: places stages on the live nodes, ships each node its stage once, and re-plans.

It lives in the entry (the edge opens every connection, so it can reach every node). It follows the
registry's ``nodes/`` keys — a watch for quick reactions plus a periodic re-read, which also covers a
registry that restarted — and whenever the set of live nodes changes it:

1. computes the placement over the live nodes (a tier without a live node is left out);
2. makes sure every node has its stage file (``PutStage`` only when ``Assign`` says it is missing; the
   node caches it on disk by sha256, so weights cross the network once per node, not per request);
3. assigns the stages from the last tier to the first, so a stage's replicas of the next tier are ready
   before rows arrive, then hands the entry the new plan and publishes it under ``plans/<edge>``.

A node that cannot be reached, or whose stream broke, is left out with a growing back-off
(``runtime/failover.py``) until it registers anew or its back-off runs out.

Building stage files and measuring a ``codec: auto`` link run torch, so they run in an executor, never
on the event loop. The clock and the sleep the coordinator waits with are injected (the real ones by
default), so its timing can be tested on a fake clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Literal

from splitexit.aio import stop
from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.codec_names import CodecSpec, parse_codec
from splitexit.control.admission import Proofs, judge
from splitexit.control.members import NODES, NodeInfo, parse_node_info
from splitexit.control.registry import Registry
from splitexit.cuts import MODEL_OUTPUT, Cut
from splitexit.errors import ClusterError, NodeBusyError, NodeUnavailableError
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stage_file import sha256_hex, stage_file
from splitexit.plan.codec_choice import link_codec
from splitexit.runtime.control_client import ControlPort, NodeControl
from splitexit.runtime.control_messages import Assignment
from splitexit.runtime.failover import Backoff, NodeBans
from splitexit.runtime.placement import PlacedStage, Placement, default_placement
from splitexit.runtime.security import node_credentials

__all__ = ["Coordinator", "Placer", "PlanChange"]

logger = logging.getLogger(__name__)

#: Chooses the placement for the cluster (with joined nodes) over the given live nodes.
Placer = Callable[[ClusterSpec, set[str]], Placement]
#: Opens the control calls to one node (gRPC by default; the in-process twin in tests).
Connect = Callable[[NodeSpec], ControlPort]
#: Installs a placement at the edge: the placement, the first stage's replicas, the codec towards them.
OnPlan = Callable[[Placement, list[NodeSpec], CodecSpec | None], Awaitable[None]]

#: Seconds between re-reads of the registrations (the watch may have missed a change, e.g. a restart).
RESYNC_INTERVAL = 2.0
#: Seconds a burst of changes (a node and its lease) gets to settle into one plan.
SETTLE = 0.05
#: Seconds between looks at the registry while waiting for every tier at start.
START_POLL = 0.2
#: Seconds ``start`` waits for every tier of the cluster file to have a live node.
START_WAIT = 30.0
#: Seconds without a live node in some tier before the edge says what it is waiting for (then it waits on).
START_HINT_AFTER = 3.0
#: Seconds a registration's address has to answer the Health call that proves its name.
PROOF_TIMEOUT = 2.0
#: Registry prefix each edge's current plan is published under, as ``plans/<edge>`` (for people and tools).
PLANS = "plans/"
#: Waits before uploading a stage again to a node that was storing another upload (another edge's, often
#: of the same file), and how many tries before it counts as unreachable (about 16 s in all).
BUSY_RETRY, BUSY_TRIES = Backoff(first=0.05, cap=1.0), 20


#: Why the chain was placed anew (see :class:`PlanChange`).
PlanCause = Literal["start", "membership", "measured", "refused"]


@dataclass(frozen=True)
class PlanChange:
    """A placement the coordinator installed, and why (for the run report)."""

    time: float
    placement: Placement
    reason: str
    #: start, membership (a node joined, left or broke), measured (the re-planner's), refused (a node
    #: refused its stage, so the chain was placed again without it)
    cause: PlanCause = "start"


def shipped_bytes(shipments: Iterable[tuple[str, str, int]]) -> dict[str, int]:
    """Stage-file bytes uploaded to each node, from the coordinator's ``(node, sha256, bytes)`` shipments."""
    totals: dict[str, int] = {}
    for node, _, size in shipments:
        totals[node] = totals.get(node, 0) + size
    return totals


@dataclass(frozen=True)
class MembershipChange:
    """A node joined the live set, left it (its registration is gone) or broke (a stream to it failed)."""

    time: float
    node: str
    event: Literal["joined", "left", "broke"]


class Coordinator:
    """Keeps the chain placed on the live nodes; ``on_plan`` installs each placement at the edge."""

    def __init__(self, net: EarlyExitNet, cluster: ClusterSpec, registry: Registry, on_plan: OnPlan, *,
                 placer: Placer | None = None, connect: Connect | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, executor: Executor | None = None,
                 refusals: Callable[[], Mapping[str, str]] = dict):
        """``connect`` opens a node's control calls (default: gRPC with the edge's credentials); ``clock`` and
        ``sleep`` are what the coordinator times and waits with; ``executor`` runs its CPU work: the placer
        (planning), stage files and codec choice (default: the loop's); ``refusals`` says which nodes turn this
        edge away and why (wrong token, CA, name), so that ``start`` can say so at once."""
        self.net, self.cluster, self.registry = net, cluster, registry
        self.on_plan = on_plan
        self.placer: Placer = placer or (lambda live_cluster, live: default_placement(net, live_cluster, live))
        self._reason: tuple[str, PlanCause] | None = None  # (reason, cause) of the re-plan asked for
        self.edge = cluster.edge
        self.placement: Placement | None = None
        self.changes: list[PlanChange] = []
        self.membership: list[MembershipChange] = []  # after the first plan (the members it started with are not news)
        self.shipments: list[tuple[str, str, int]] = []  # (node, stage sha256, bytes) for every upload
        self.members: dict[str, NodeInfo] = {}
        self.bans = NodeBans(clock=clock)
        self.stage_refusals: dict[str, str] = {}  # node -> why it refused its stage (until it registers anew)
        self.proofs = Proofs()  # registrations proven by a TLS handshake, refusals already logged
        self._unproven = NodeBans(clock=clock)  # name@address whose proof failed, backed off
        self._clock, self._sleep, self._executor = clock, sleep, executor
        self._connect: Connect = connect or self._grpc_control
        self._controls: dict[str, ControlPort] = {}
        self._stage_files: dict[tuple[Cut, Cut, frozenset[int]], tuple[str, bytes]] = {}
        self._codecs: dict[tuple[Cut, str], CodecSpec] = {}
        self._dirty = asyncio.Event()
        self._replanning = False
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: asyncio.Task[None] | None = None
        self._credentials = node_credentials(cluster, self.edge.name)
        self._refusals = refusals

    async def start(self, *, wait: float = START_WAIT) -> None:
        """Place the chain once every tier of the cluster file has a live node (or fail after ``wait`` s)."""
        started = self._clock()
        deadline, hinted = started + wait, False
        while True:
            await self._read_members()
            missing = self._missing_tiers()
            if not missing:
                break
            refused = self._refusals()
            for tier, members in missing.items():
                if all(name in refused for name in members):  # every node of the tier answers, and refuses us
                    raise ClusterError(f"no node of tier {tier} accepts this edge:\n" +
                                       "\n".join(f"  {refused[name]}" for name in members))
            if not hinted and self._clock() >= started + START_HINT_AFTER:
                hinted = True
                logger.warning("waiting for %s: nothing answers there yet. Start the workers with `splitexit up "
                               "--cluster FILE` (or `splitexit node` on each machine); waiting up to %.0f s",
                               self._describe_missing(missing), wait)
            if self._clock() >= deadline:
                names = "; ".join(f"tier {t}: {', '.join(n)}" for t, n in missing.items())
                raise ClusterError(f"no node of {names} is up after {wait:.0f} s. Start them with `splitexit up "
                                   "--cluster FILE` or `splitexit node --cluster FILE --name NAME`.")
            await self._sleep(START_POLL)
        await self._replan("start", "start")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(), name="coordinator-watch"),
                       loop.create_task(self._resync(), name="coordinator-resync"),
                       loop.create_task(self._follow(), name="coordinator-replan")]

    def _describe_missing(self, missing: dict[int, list[str]]) -> str:
        """``tier 1 (cloud1 at 127.0.0.1:50061)``: the tiers with no live node, and where the file puts them."""
        return "; ".join(f"tier {t} ({', '.join(f'{n} at {self.cluster.node(n).address}' for n in names)})"
                         for t, names in missing.items())

    def node_broke(self, name: str) -> None:
        """A stream to ``name`` broke: re-plan without it now, rather than when its lease runs out. It is
        tried again after its back-off (:class:`~splitexit.runtime.failover.NodeBans`), or as soon as it
        registers anew (a restart)."""
        if name in self.members and not self.bans.banned(name):
            self.bans.fail(name)
            self.membership.append(MembershipChange(time.time(), name, "broke"))
            self._dirty.set()

    def _missing_tiers(self) -> dict[int, list[str]]:
        live = set(self.members)
        return {tier: [n.name for n in members] for tier, members in self.cluster.tiers().items()
                if tier > 0 and not live & {n.name for n in members}}

    async def _read_members(self) -> bool:
        """Re-read the registrations and keep those the cluster file's rules believe (``control/admission.py``);
        True if the set of live nodes (or an address) changed."""
        entries = await self.registry.items(NODES)
        members: dict[str, NodeInfo] = {}
        for key, value in entries.items():
            try:
                info = parse_node_info(key, value)
            except ValueError as exc:
                self.proofs.refuse(key, value, str(exc))
                continue
            verdict = judge(self.cluster, info)
            believed, why = verdict.believe, verdict.refused
            if believed is not None and verdict.needs_proof and not await self._proven(believed):
                believed, why = verdict.otherwise, (f"{info.address} did not prove it is {info.name} (no TLS handshake "
                                                    "with a cluster certificate for that name)")
            if believed is None:
                self.proofs.refuse(key, value, why)
                continue
            members[believed.name] = believed
        changed = members != self.members
        if changed:
            if self.placement is not None:  # the members the first plan starts with are not news
                now, before, after = time.time(), set(self.members), set(members)
                self.membership += [MembershipChange(now, name, "joined") for name in sorted(after - before)]
                self.membership += [MembershipChange(now, name, "left") for name in sorted(before - after)]
            for name, info in members.items():  # a node that (re)registered gets a fresh chance
                if self.members.get(name) != info:
                    self.bans.succeed(name)
                    self.stage_refusals.pop(name, None)
            self.members = members
        return changed

    async def _watch(self) -> None:
        async for _ in self.registry.watch(NODES):
            if await self._read_members():
                self._dirty.set()

    async def _resync(self) -> None:
        while True:
            await self._sleep(RESYNC_INTERVAL)
            if self.bans.lapsed():
                self._dirty.set()  # a backed-off node's wait is over: try it again
            try:
                if await self._read_members():
                    self._dirty.set()
            except Exception as exc:  # noqa: BLE001 - the registry may be restarting; serving goes on
                logger.warning("coordinator: cannot read the registry (%s); keeping the current plan", exc)

    async def _proven(self, info: NodeInfo) -> bool:
        """Whether ``info.address`` answers a Health call over TLS with a cluster certificate for ``info.name``
        (remembered per name, address and incarnation; a failed proof is tried again after a back-off)."""
        if self.proofs.knows(info):
            return True
        attempt = f"{info.name}@{info.address}"
        if self._unproven.banned(attempt):
            return False
        control = self._connect(info.spec())
        try:
            await control.health(PROOF_TIMEOUT)
        except (NodeUnavailableError, ClusterError) as exc:
            self._unproven.fail(attempt)
            logger.info("coordinator: %s is not proven yet: %s", attempt, exc)
            return False
        finally:
            await control.close()
        self._unproven.succeed(attempt)
        self.proofs.record(info)
        return True

    def request_replan(self, reason: str, cause: PlanCause = "measured") -> None:
        """Place the chain again soon (the placer's inputs changed, e.g. a link measured slower)."""
        self._reason = (reason, cause)
        self._dirty.set()

    @property
    def busy(self) -> bool:
        """A re-plan is pending or under way."""
        return self._dirty.is_set() or self._replanning

    async def _follow(self) -> None:
        while True:
            await self._dirty.wait()
            await self._sleep(SETTLE)  # let a burst of changes (a node and its lease) settle into one plan
            self._replanning = True
            self._dirty.clear()
            (reason, cause), self._reason = self._reason or ("membership changed", "membership"), None
            try:
                await self._replan(reason, cause)
            except Exception:  # noqa: BLE001 - keep coordinating; the next change or resync tries again
                logger.exception("coordinator: re-planning failed; keeping the current plan")
            finally:
                self._replanning = False

    def _cluster_with_members(self) -> ClusterSpec:
        """The cluster file plus nodes that joined without being in it, with registered addresses."""
        members = self.members
        nodes = [self.edge]
        for node in self.cluster.workers:
            info = members.get(node.name)
            nodes.append(node.model_copy(update={"address": info.address}) if info else node)
        known = {n.name for n in nodes}
        nodes += [info.spec() for name, info in sorted(members.items()) if name not in known]
        return self.cluster.model_copy(update={"nodes": tuple(nodes)})

    async def _replan(self, reason: str, cause: PlanCause) -> None:
        while True:
            cluster = self._cluster_with_members()
            placement = await asyncio.get_running_loop().run_in_executor(  # planning is CPU work
                self._executor, self.placer, cluster, self.bans.allowed(set(self.members)))
            failed = await self._assign_all(placement, cluster)
            for stage in placement.stages[1:]:
                for name in set(stage.nodes) - set(failed):
                    self.bans.succeed(name)
            if not failed:
                break
            for name in failed:
                self.bans.fail(name)
            self._check_tiers_usable()
            reason, cause = "; ".join(f"{name} {why}" for name, why in sorted(failed.items())), "refused"
        first = placement.after(placement.stages[0])
        peers = [cluster.node(n) for n in first.nodes] if first else []
        await self.on_plan(placement, peers, await self._codec(placement, placement.stages[0], peers, cluster))
        if self.placement is None or placement != self.placement:
            self.changes.append(PlanChange(time.time(), placement, reason, cause))
            logger.info("plan %d (%s): %s", placement.version, reason, placement.describe())
        self.placement = placement
        document = {"version": placement.version, "stages": [
            {"tier": s.tier, "nodes": list(s.nodes), "start": s.start, "end": s.end} for s in placement.stages]}
        self._publishing = asyncio.get_running_loop().create_task(self._publish(json.dumps(document).encode()))

    async def _publish(self, document: bytes) -> None:
        """Put the plan in the registry for people and tools to read; serving never waits for it."""
        try:
            await self.registry.put(PLANS + self.edge.name, document)
        except Exception as exc:  # noqa: BLE001 - informational; the registry may be restarting
            logger.warning("coordinator: cannot publish the plan (%s)", exc)

    def _check_tiers_usable(self) -> None:
        """Fail when every node of a tier refused its stage: no plan can use that tier, and leaving it out
        would quietly move its work elsewhere (a node that is only unreachable may come back instead)."""
        for tier, members in self.cluster.tiers().items():
            names = [n.name for n in members]
            if tier > 0 and all(name in self.stage_refusals for name in names):
                raise ClusterError(f"no node of tier {tier} can take its stage:\n" +
                                   "\n".join(f"  {name}: {self.stage_refusals[name]}" for name in names))

    async def _assign_all(self, placement: Placement, cluster: ClusterSpec) -> dict[str, str]:
        """Assign every worker its stage, last tier first; the nodes that could not take theirs, and why."""
        failed: dict[str, str] = {}
        stages = list(placement.stages)
        for stage in reversed(stages[1:]):
            after = placement.after(stage)
            before = placement.before(stage)
            peers = [cluster.node(n) for n in after.nodes] if after else []
            sha, data = await self._stage_file(stage, placement.disabled_exits)
            assignment = Assignment(plan_version=placement.version, stage_sha256=sha, edge=self.edge.name,
                                    downstream=tuple(peers),
                                    upstream=tuple(before.nodes) if before else ())
            codecs = [await self._codec(placement, stage, peers, cluster, sender=name) for name in stage.nodes]
            results = await asyncio.gather(*(self._assign(cluster.node(name), replace(assignment, codec=codec), data)
                                             for name, codec in zip(stage.nodes, codecs)))
            failed |= {name: why for name, why in zip(stage.nodes, results) if why is not None}
        return failed

    async def _assign(self, node: NodeSpec, assignment: Assignment, data: bytes) -> str | None:
        """Assign ``node`` its stage (uploading the file first if it lacks it); None when it took it, else why
        not: unreachable (it may come back), or refused (its reason is kept in ``stage_refusals``)."""
        control = await self._control(node)
        try:
            if not await control.assign(assignment) and not await self._ship(node, control, assignment, data):
                return "refused its stage: it asked for the file again right after the upload"
            return None
        except NodeUnavailableError as exc:
            logger.warning("coordinator: %s", exc)
            await self._forget_control(node.name)  # a restarted node gets a fresh channel, not one backing off
            return "unreachable"
        except ClusterError as exc:  # the node answered, and will not take this stage: its replicas carry the tier
            logger.warning("coordinator: %s; planning without it", exc)
            self.stage_refusals[node.name] = str(exc)
            return f"refused its stage ({exc})"

    async def _ship(self, node: NodeSpec, control: ControlPort, assignment: Assignment, data: bytes) -> bool:
        """Upload the stage file, then assign again; whether the node serves it now. A node storing another
        upload is asked again after a short wait, and may meanwhile have the file from that upload."""
        sha = assignment.stage_sha256
        for attempt in range(1, BUSY_TRIES + 1):
            try:
                await control.put_stage(sha, data)
            except NodeBusyError:
                if attempt == BUSY_TRIES:
                    raise
                await self._sleep(BUSY_RETRY.delay(attempt))
                if await control.assign(assignment):
                    return True
                continue
            self.shipments.append((node.name, sha, len(data)))
            logger.info("shipped stage %s… (%d bytes) to %s", sha[:12], len(data), node.name)
            break
        return await control.assign(assignment)

    async def _stage_file(self, stage: PlacedStage, disabled: frozenset[int]) -> tuple[str, bytes]:
        """The stage's file and its sha256, built once per range and exits (in the executor: torch work)."""
        key = (stage.start, stage.end, disabled)
        if key not in self._stage_files:
            def build() -> tuple[str, bytes]:
                data = stage_file(self.net, stage.start, stage.end, disabled_exits=disabled)
                return sha256_hex(data), data

            self._stage_files[key] = await asyncio.get_running_loop().run_in_executor(self._executor, build)
        return self._stage_files[key]

    async def _codec(self, placement: Placement, stage: PlacedStage, peers: list[NodeSpec], cluster: ClusterSpec,
                     *, sender: str | None = None) -> CodecSpec | None:
        """The codec for rows leaving ``stage``: the placement's (a plan's), else the file's link from the
        sender to the first replica (``auto`` is measured in the executor)."""
        if stage.end is MODEL_OUTPUT or not peers:
            return None
        chosen = placement.codec_after(stage)
        if chosen:
            return parse_codec(chosen)
        link = cluster.link(sender or stage.nodes[0], peers[0].name)
        key = (stage.end, link.codec)
        if key not in self._codecs:
            self._codecs[key] = await asyncio.get_running_loop().run_in_executor(
                self._executor, link_codec, self.net, stage.end, link)
        return self._codecs[key]

    def _grpc_control(self, node: NodeSpec) -> ControlPort:
        return NodeControl(node, credentials=self._credentials, token=self.cluster.security.token,
                           message_limit=self.cluster.message_limit)

    async def _control(self, node: NodeSpec) -> ControlPort:
        control = self._controls.get(node.name)
        if control is None or control.address != (node.address or ""):
            if control is not None:  # the node moved: the old channel goes nowhere
                await control.close()
            control = self._connect(node)
            self._controls[node.name] = control
        return control

    async def _forget_control(self, name: str) -> None:
        control = self._controls.pop(name, None)
        if control is not None:
            await control.close()

    async def close(self) -> None:
        await stop(*self._tasks, *([self._publishing] if self._publishing else []))
        for control in self._controls.values():
            await control.close()
