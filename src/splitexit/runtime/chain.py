"""Assemble the hop one member of a chain runs for one plan: its stage, its codec, and the way on.

The edge (`Entry`) and every worker (`Node`) build theirs here, so both ends of every link agree on
what crosses it: the codec is chosen once, by the coordinator, and sent to the node that encodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from splitexit.config import ClusterSpec, LinkSpec, NodeSpec
from splitexit.model.exits import EarlyExitNet
from splitexit.model.stages import INPUT, Stage
from splitexit.runtime.codec import CodecSpec, choose_codec, parse_codec
from splitexit.runtime.hop import Hop
from splitexit.runtime.remote import LinkCounters
from splitexit.runtime.replicas import ReplicaSet
from splitexit.runtime.security import NodeCredentials
from splitexit.runtime.stage import StageExecutor
from splitexit.runtime.wire import encode_tensors

__all__ = ["link_codec", "node_credentials", "stage_hop"]

#: Inputs pushed through the net to get real activations for `codec: auto`.
AUTO_CODEC_SAMPLES = 8


def link_codec(net: EarlyExitNet, cut: int, link: LinkSpec) -> CodecSpec:
    """The link's codec; ``auto`` is measured on activations at ``cut`` against the link's bandwidth."""
    if link.codec.strip().lower() != "auto":
        return parse_codec(link.codec)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(AUTO_CODEC_SAMPLES, *net.input_shape, generator=generator).to(net.input_dtype)
    if cut == INPUT:
        return choose_codec([x], link.bandwidth)
    with torch.inference_mode():
        activations = net.segment_between(None, cut)(net._prepare(x))
    return choose_codec(list(activations), link.bandwidth)


def node_credentials(cluster: ClusterSpec, name: str) -> NodeCredentials | None:
    """This node's TLS identity, when the cluster file asks for TLS."""
    tls = cluster.security.tls
    return NodeCredentials.load(Path(tls), name) if tls else None


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
