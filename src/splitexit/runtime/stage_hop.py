"""Assemble the hop one member of a chain runs for one plan: its stage, its codec, and the way on.

The edge and every worker build theirs here, so both ends of every link agree on what crosses it: the
codec is chosen once, by the coordinator, and sent to the node that encodes.

The way on is a :class:`NextStage`: the :class:`~splitexit.runtime.replicas.ReplicaSet` of data-plane
connections unless the caller passes another ``open_next`` (the request-path tests pass an in-memory channel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.codec_names import CodecSpec
from splitexit.cuts import MODEL_OUTPUT
from splitexit.model.stages import Stage
from splitexit.runtime.devices import CPU, ComputeDevice
from splitexit.runtime.executor import StageExecutor
from splitexit.runtime.hop import Downstream, Hop
from splitexit.runtime.metrics import ChainMetrics
from splitexit.runtime.remote import LinkCounters, LinkReport
from splitexit.runtime.replicas import ReplicaSet
from splitexit.runtime.security import NodeCredentials, node_credentials
from splitexit.wire.data_messages import encode_tensors

__all__ = ["NextStage", "OpenNextStage", "stage_hop"]


class NextStage(Downstream, Protocol):
    """The replicas of the next stage, as a forwarding hop and the edge's request path use them."""

    async def update(self, peers: Sequence[NodeSpec], *, wait: bool = True) -> None:
        """Serve exactly ``peers`` from now on."""

    async def health_links(self) -> dict[tuple[str, str], LinkReport]:
        """Every link from here down, as its sender reports it."""


class OpenNextStage(Protocol):
    """Builds a plan's (unconnected) :class:`NextStage`; :class:`ReplicaSet` is the real one."""

    def __call__(self, *, sender: str, cluster: ClusterSpec, plan_version: int,
                 credentials: NodeCredentials | None, on_broken: Callable[[str], None] | None,
                 counters: dict[str, LinkCounters] | None) -> NextStage: ...


def stage_hop(stage: Stage, *, node: NodeSpec, cluster: ClusterSpec, plan_version: int, codec: CodecSpec | None,
              on_broken: Callable[[str], None] | None = None, counters: dict[str, LinkCounters] | None = None,
              open_next: OpenNextStage = ReplicaSet, metrics: ChainMetrics | None = None,
              compute: ComputeDevice = CPU) -> Hop:
    """``node``'s hop for one plan: the stage executor (computing on ``compute``, where the stage's net
    already is), and the next stage's replicas (unconnected) unless the stage ends at the model output; its
    batches, exits and rows are counted in ``metrics``."""
    replicas = None
    encode = None
    if stage.end is not MODEL_OUTPUT:
        if codec is None:
            raise ValueError("a stage that forwards rows needs the codec of its outgoing link")
        encode = lambda tensors: encode_tensors(tensors, codec)  # noqa: E731
        replicas = open_next(sender=node.name, cluster=cluster, plan_version=plan_version,
                             credentials=node_credentials(cluster, node.name), on_broken=on_broken,
                             counters=counters)
    executor = StageExecutor(stage, batching=cluster.batching, slowdown=node.slowdown, encode=encode, name=node.name,
                             metrics=metrics, compute=compute)
    return Hop(node.name, executor, replicas)
