"""A member cannot steer re-planning by reporting links upstream of it (issue 12, finding 6).

The attack: cloud1 is a member of the cluster (it is in the file, at the file's address, with the token),
and its Health replies carry made-up link figures: the edge's own link to it at 1 kbit/s and a trillion
bytes, and a link from the edge to a node that does not exist. Here the lying member is a proxy at cloud1's
address in front of the real cloud1 process: every call is passed through, and Health replies get the
forged links added. The edge must keep its own figures for its own link, drop the link that is not
downstream of cloud1, and still take what cloud1 may report (its own links onward).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from splitexit.app.run import ensure_cluster_token
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import LocalCluster
from splitexit.wire import wire_pb2
from support import digits_net, free_port

pytestmark = pytest.mark.slow

INPUTS = 32
FORGED_BANDWIDTH = 1000.0
FORGED_BYTES = 10**12
FORGED = [
    wire_pb2.LinkBytes(source="edge", target="cloud1", raw_bytes=FORGED_BYTES, wire_bytes=FORGED_BYTES,
                       messages=1, rows=1, bandwidth_bps=FORGED_BANDWIDTH),  # the edge's own link
    wire_pb2.LinkBytes(source="edge", target="phantom", raw_bytes=FORGED_BYTES, wire_bytes=FORGED_BYTES,
                       messages=1, rows=1, bandwidth_bps=FORGED_BANDWIDTH),  # not downstream of cloud1
    wire_pb2.LinkBytes(source="cloud1", target="onward", raw_bytes=7, wire_bytes=7, messages=1, rows=1,
                       bandwidth_bps=5e6),  # cloud1's own link onward: a member may report that
]


class LyingProxy:
    """Passes every call to ``target`` unchanged (bytes, metadata, errors), except that Health replies get
    :data:`FORGED` added to their links. ``health_replies`` counts the forged replies sent."""

    def __init__(self, address: str, target: str):
        self.address, self.target = address, target
        self.health_replies = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> LyingProxy:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((_Forwarder(self),))
        self._server.add_insecure_port(self.address)
        await self._server.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None and self._channel is not None
        await self._server.stop(grace=0)
        await self._channel.close()

    def forward_unary(self, method: str):  # noqa: ANN201 - a grpc method handler
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            assert self._channel is not None
            try:
                reply = await self._channel.unary_unary(method)(request, metadata=context.invocation_metadata())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            if method.endswith("/Health"):
                health = wire_pb2.HealthReply.FromString(reply)
                health.links.extend(FORGED)
                self.health_replies += 1
                return health.SerializeToString()
            return reply
        return grpc.unary_unary_rpc_method_handler(call)

    def forward_stream_unary(self, method: str):  # noqa: ANN201
        async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            assert self._channel is not None
            try:
                return await self._channel.stream_unary(method)(requests, metadata=context.invocation_metadata())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
        return grpc.stream_unary_rpc_method_handler(call)


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, proxy: LyingProxy):
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails):  # noqa: ANN201
        method = details.method
        if method.endswith("/PutStage"):
            return self.proxy.forward_stream_unary(method)
        return self.proxy.forward_unary(method)


def test_a_member_reporting_an_upstream_link_does_not_change_the_edges_figures(tmp_path: Path) -> None:
    proxy_port, node_port = free_port(), free_port()
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"nodes": [
        {"name": "edge", "role": "edge", "ends_at": "input"},  # every row crosses edge -> cloud1
        {"name": "cloud1", "address": f"127.0.0.1:{proxy_port}"}]}))
    ensure_cluster_token(cluster_file)
    net = digits_net(exit_quantile=1.0)
    x = torch.randn(INPUTS, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    async def main() -> tuple[list[int], dict, dict, int]:
        async with LyingProxy(f"127.0.0.1:{proxy_port}", f"127.0.0.1:{node_port}") as proxy:
            entry = Entry(net, load_cluster(cluster_file))
            try:
                await entry.start()
                result = await entry.run(TensorDataset(x, torch.zeros(INPUTS, dtype=torch.long)))
                return ([r.prediction for r in sorted(result.records, key=lambda r: r.index)], result.links,
                        await entry.link_bandwidths(), proxy.health_replies)
            finally:
                await entry.close()

    local = LocalCluster(cluster_file, load_cluster(cluster_file), log_dir=tmp_path, cache_root=tmp_path / "stages")
    try:
        local.launch("cloud1", "--port", str(node_port))  # the real node, behind the proxy
        local.wait_ready("cloud1")
        predictions, links, bandwidths, forged_replies = asyncio.run(main())
    finally:
        local.stop()

    assert predictions == net.infer(x).prediction.tolist()  # the proxy passed the real node's answers through
    assert forged_replies > 0, "the forged reports never reached the edge: the test proved nothing"
    own = links["edge->cloud1"]
    assert own.raw_bytes < FORGED_BYTES and own.rows == INPUTS, own  # the edge's own counters, not the report
    assert "edge->phantom" not in links
    assert links["cloud1->onward"].raw_bytes == 7  # what cloud1 may report about its own links still counts
    assert bandwidths.get(("edge", "cloud1")) != FORGED_BANDWIDTH
    assert ("edge", "phantom") not in bandwidths
