"""Assemble the hop one member of a chain runs for one plan: its stage, its codec, and the way on.

The edge and every worker build theirs here, so both ends of every link agree on what crosses it: the
codec is chosen once, by the coordinator, and sent to the node that encodes.
"""

from __future__ import annotations

from collections.abc import Callable

from splitexit.config import ClusterSpec, NodeSpec
from splitexit.config.codec_names import CodecSpec
from splitexit.model.stages import Stage
from splitexit.runtime.executor import StageExecutor
from splitexit.runtime.hop import Hop
from splitexit.runtime.remote import LinkCounters
from splitexit.runtime.replicas import ReplicaSet
from splitexit.runtime.security import node_credentials
from splitexit.wire.messages import encode_tensors

__all__ = ["stage_hop"]


def stage_hop(stage: Stage, *, node: NodeSpec, cluster: ClusterSpec, plan_version: int, codec: CodecSpec | None,
              on_broken: Callable[[str], None] | None = None, counters: dict[str, LinkCounters] | None = None
              ) -> Hop:
    """``node``'s hop for one plan: the stage executor, and the next stage's replicas (unconnected) unless
    the stage ends at the model output."""
    replicas = None
    encode = None
    if stage.end is not None:
        if codec is None:
            raise ValueError("a stage that forwards rows needs the codec of its outgoing link")
        encode = lambda tensors: encode_tensors(tensors, codec)  # noqa: E731
        replicas = ReplicaSet(sender=node.name, cluster=cluster, plan_version=plan_version,
                              credentials=node_credentials(cluster, node.name), on_broken=on_broken,
                              counters=counters)
    executor = StageExecutor(stage, batching=cluster.batching, slowdown=node.slowdown, encode=encode, name=node.name)
    return Hop(node.name, executor, replicas)
