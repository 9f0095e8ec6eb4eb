"""Assemble the hop one member of a chain runs: its stage, its codec, and the connection onward.

The edge (`Entry`) and every worker (`Node`) build theirs here, from the same package, cluster file
and placement, so both ends of every link agree on what crosses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from splitexit.config import ClusterSpec, LinkSpec
from splitexit.model.exits import EarlyExitNet
from splitexit.runtime.codec import CodecSpec, choose_codec, parse_codec
from splitexit.runtime.hop import Hop
from splitexit.runtime.placement import Placement
from splitexit.runtime.remote import RemoteStage
from splitexit.runtime.security import NodeCredentials
from splitexit.runtime.stage import StageExecutor
from splitexit.runtime.wire import encode_tensors

__all__ = ["build_hop", "link_codec", "node_credentials"]

#: Inputs pushed through the net to get real activations for `codec: auto`.
AUTO_CODEC_SAMPLES = 8


def link_codec(net: EarlyExitNet, cut: int, link: LinkSpec) -> CodecSpec:
    """The link's codec; ``auto`` is measured on activations at ``cut`` against the link's bandwidth."""
    if link.codec.strip().lower() != "auto":
        return parse_codec(link.codec)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(AUTO_CODEC_SAMPLES, *net.input_shape, generator=generator).to(net.input_dtype)
    with torch.inference_mode():
        activations = net.segment_between(None, cut)(net._prepare(x))
    return choose_codec(list(activations), link.bandwidth)


def node_credentials(cluster: ClusterSpec, name: str) -> NodeCredentials | None:
    """This node's TLS identity, when the cluster file asks for TLS."""
    tls = cluster.security.tls
    return NodeCredentials.load(Path(tls), name) if tls else None


def build_hop(net: EarlyExitNet, cluster: ClusterSpec, placement: Placement, name: str) -> tuple[Hop, RemoteStage | None]:
    """The hop ``name`` runs, and its client to the next node (None for the last node; not yet connected)."""
    me = placement.of(name)
    spec = cluster.node(name)
    after = placement.next_after(name)
    remote = None
    encode = None
    if after is not None:
        link = cluster.link(name, after.node)
        codec = link_codec(net, me.end, link)  # type: ignore[arg-type]  # only the last stage ends at None
        encode = lambda tensors: encode_tensors(tensors, codec)  # noqa: E731
        remote = RemoteStage(sender=name, target=cluster.node(after.node), link=link,
                             plan_version=placement.version, message_limit=cluster.message_limit,
                             credentials=node_credentials(cluster, name), token=cluster.security.token)
    executor = StageExecutor(net.stage(me.start, me.end), batching=cluster.batching, slowdown=spec.slowdown,
                             encode=encode, name=name)
    return Hop(name, executor, remote), remote
