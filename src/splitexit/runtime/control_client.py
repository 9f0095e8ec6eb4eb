"""The edge's control calls to one node: assign it a stage, upload a stage file, ask its health, profile it.

gRPC errors stop here (as they do in `remote.py` for the data path): a node that cannot be reached raises
:class:`~splitexit.errors.NodeUnavailableError`; one that refuses what it was sent raises
:class:`~splitexit.errors.ClusterError` with its reason.
"""

from __future__ import annotations

import grpc

from splitexit.config import NodeSpec
from splitexit.errors import ClusterError, NodeUnavailableError
from splitexit.runtime.remote import HEADER_ROOM, open_channel
from splitexit.runtime.security import NodeCredentials, token_metadata
from splitexit.wire import wire_pb2, wire_pb2_grpc

__all__ = ["NodeControl"]

#: Seconds a control call may take (an upload of a large stage file included).
CONTROL_TIMEOUT = 30.0
#: Seconds a node may take to time the model and measure its links (ResNet-50 on a slow CPU takes minutes).
PROFILE_TIMEOUT = 1800.0
#: Stage files travel in pieces of at most this size (less when the message limit is lower).
UPLOAD_CHUNK = 1 << 20


class NodeControl:
    def __init__(self, node: NodeSpec, *, credentials: NodeCredentials | None, token: str | None,
                 message_limit: int):
        self.node = node
        self.address = node.address or ""
        self.message_limit = message_limit
        self._channel = open_channel(self.address, node.name, credentials, message_limit)
        self._stub = wire_pb2_grpc.StageServiceStub(self._channel)
        self._metadata = token_metadata(token)

    async def assign(self, request: wire_pb2.AssignRequest) -> bool:
        """Assign the stage; False if the node lacks its file (upload it, then assign again)."""
        reply = await self._call("stage assignment", self._stub.Assign(request, metadata=self._metadata,
                                                                       timeout=CONTROL_TIMEOUT))
        return not reply.missing_stage

    async def put_stage(self, sha256: str, data: bytes) -> None:
        size = max(1, min(UPLOAD_CHUNK, self.message_limit - HEADER_ROOM))

        async def chunks():  # noqa: ANN202
            for offset in range(0, len(data), size):
                yield wire_pb2.StageChunk(sha256=sha256, total_size=len(data), data=data[offset:offset + size])

        await self._call("stage upload", self._stub.PutStage(chunks(), metadata=self._metadata,
                                                             timeout=CONTROL_TIMEOUT))

    async def profile(self, request: wire_pb2.ProfileRequest) -> wire_pb2.ProfileReply:
        return await self._call("profile request", self._stub.Profile(request, metadata=self._metadata,
                                                                      timeout=PROFILE_TIMEOUT))

    async def health(self, timeout: float) -> wire_pb2.HealthReply:
        return await self._call("health call", self._stub.Health(wire_pb2.HealthRequest(), metadata=self._metadata,
                                                                 timeout=timeout))

    async def _call(self, what: str, call):  # noqa: ANN001, ANN202 - a grpc.aio call; its reply
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details()}"
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                              grpc.StatusCode.UNAUTHENTICATED):
                raise ClusterError(f"node {self.node.name} refused the {what} ({detail}); check that the node "
                                   "and this edge use the same cluster file, certificates and token") from exc
            raise NodeUnavailableError(f"{what} to {self.node.name} at {self.address} failed ({detail})") from exc

    async def close(self) -> None:
        await self._channel.close()
