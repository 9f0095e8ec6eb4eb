"""The in-process twin of the control channel: control calls to :class:`~splitexit.runtime.node.Node`
objects of this process, without gRPC, so the coordinator can be run and tested with real nodes and no network.

Requests and replies still go through their protobuf encode and decode, so the twin checks what the
wire would. A node that is not (or no longer) in the directory the twin was given is unreachable, as a
stopped process would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from splitexit.config import NodeSpec
from splitexit.errors import NodeBusyError, NodeUnavailableError, WireError
from splitexit.runtime.control_client import UPLOAD_CHUNK
from splitexit.runtime.control_messages import (
    Assignment,
    NodeHealth,
    NodeProfile,
    ProfileJob,
    decode_assignment,
    decode_health,
    decode_node_profile,
    decode_profile_job,
    decode_stage_chunk,
    encode_assignment,
    encode_health,
    encode_node_profile,
    encode_profile_job,
    encode_stage_chunks,
)

if TYPE_CHECKING:
    from splitexit.runtime.node import Node

__all__ = ["LocalNodeControl"]


class LocalNodeControl:
    """A :class:`~splitexit.runtime.control_client.ControlPort` to ``nodes[spec.name]`` in this process."""

    def __init__(self, spec: NodeSpec, nodes: Mapping[str, Node]):
        self.spec = spec
        self.nodes = nodes

    @property
    def address(self) -> str:
        return self.spec.address or ""

    def _node(self, what: str) -> Node:
        node = self.nodes.get(self.spec.name)
        if node is None or not node.accepting:
            raise NodeUnavailableError(f"{what} to {self.spec.name} failed: it does not run in this process")
        return node

    async def assign(self, assignment: Assignment) -> bool:
        node = self._node("stage assignment")
        return await node.assign(decode_assignment(encode_assignment(assignment)))

    async def put_stage(self, sha256: str, data: bytes) -> None:
        node = self._node("stage upload")

        async def chunks() -> AsyncIterator[tuple[str, int, bytes]]:
            for chunk in encode_stage_chunks(sha256, data, UPLOAD_CHUNK):
                yield decode_stage_chunk(chunk)
                await asyncio.sleep(0)  # a chunk at a time, as from the network: the loop serves in between

        try:
            await node.store_stage(chunks())
        except WireError as exc:
            if exc.code == "busy":  # as a node's gRPC face answers it (RESOURCE_EXHAUSTED)
                raise NodeBusyError(f"stage upload to {self.spec.name} turned away for now ({exc})") from exc
            raise

    async def profile(self, job: ProfileJob) -> NodeProfile:
        node = self._node("profile request")
        reply = await node.profile(decode_profile_job(encode_profile_job(job)))
        return decode_node_profile(encode_node_profile(reply))

    async def health(self, timeout: float) -> NodeHealth:
        node = self._node("health call")
        return decode_health(encode_health(await asyncio.wait_for(node.health(), timeout)))

    async def close(self) -> None:
        """Nothing to close: no channel."""
