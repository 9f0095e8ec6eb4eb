"""The edge's control calls to one node: assign it a stage, upload a stage file, ask its health, profile it.

Callers speak our types (:mod:`~splitexit.runtime.control_messages`); protobuf stays here. gRPC errors stop
here too (as they do in `remote.py` for the data path): a node that cannot be reached raises
:class:`~splitexit.errors.NodeUnavailableError`; one that refuses what it was sent raises
:class:`~splitexit.errors.ClusterError` with its reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

import grpc

from splitexit.config import NodeSpec
from splitexit.errors import ClusterError, NodeBusyError, NodeUnavailableError
from splitexit.runtime.control_messages import (
    Assignment,
    NodeHealth,
    NodeProfile,
    ProfileJob,
    decode_assign_reply,
    decode_health,
    decode_node_profile,
    encode_assignment,
    encode_profile_job,
    encode_stage_chunks,
)
from splitexit.runtime.remote import open_channel
from splitexit.runtime.security import NodeCredentials, token_metadata
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.grpc_options import HEADER_ROOM

__all__ = ["ControlPort", "NodeControl"]

#: Seconds a control call may take (an upload of a large stage file included).
CONTROL_TIMEOUT = 30.0
#: Seconds a node may take to time the model and measure its links (ResNet-50 on a slow CPU takes minutes).
PROFILE_TIMEOUT = 1800.0
#: Stage files travel in pieces of at most this size (less when the message limit is lower).
UPLOAD_CHUNK = 1 << 20
#: Status codes that mean the node answered and refused (anything else: it could not be reached).
#: What a TLS failure's details say when the node answered with a certificate this edge does not accept.
_WRONG_CA = ("CERTIFICATE_VERIFY_FAILED", "BAD_SIGNATURE", "certificate signature failure", "unknown ca")
_WRONG_NAME = ("Peer name", "not in peer certificate", "hostname mismatch", "Hostname Verification")
_HANDSHAKE = ("handshake failed", "Handshake failed", "SSL_ERROR")


def refusal_cause(code: grpc.StatusCode, details: str, node: str) -> str | None:
    """Why a node turned us away, and what to do; None when the call failed for a reason that may pass (the
    node is down or restarting). A refusal will not fix itself, so it is reported at once."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "wrong or missing token: give the edge and the node the same `security.token` / `token_file`"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ("this certificate may not make that call: the edge needs its own certificate (`splitexit certs "
                "issue DIR edge`) and the node must be in this cluster file")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "it refused the request as invalid (its reason is in the detail)"
    if code != grpc.StatusCode.UNAVAILABLE:
        return None
    if any(marker in details for marker in _WRONG_NAME):
        return (f"its certificate does not name it {node!r}: issue one with `splitexit certs issue DIR {node}` "
                "and give the node that one")
    if any(marker in details for marker in _WRONG_CA):
        return ("the TLS handshake failed on the certificates: the node and this edge must have certificates from "
                "the same cluster CA (`security.tls`, ca.pem)")
    if any(marker in details for marker in _HANDSHAKE):
        return "the TLS handshake failed: does the node run with the same `security.tls` as this edge?"
    return None

T = TypeVar("T")


class ControlPort(Protocol):
    """The control calls to one node, whatever carries them (:class:`NodeControl` over gRPC, or the
    in-process twin :class:`~splitexit.runtime.local_control.LocalNodeControl`)."""

    @property
    def address(self) -> str: ...

    async def assign(self, assignment: Assignment) -> bool:
        """Assign the stage; False if the node lacks its file (upload it, then assign again)."""
        ...

    async def put_stage(self, sha256: str, data: bytes) -> None: ...

    async def profile(self, job: ProfileJob) -> NodeProfile: ...

    async def health(self, timeout: float) -> NodeHealth: ...

    async def close(self) -> None: ...


class NodeControl:
    """:class:`ControlPort` over a gRPC channel of its own, with the edge's credentials and the cluster token."""

    def __init__(self, node: NodeSpec, *, credentials: NodeCredentials | None, token: str | None,
                 message_limit: int):
        self.node = node
        self._address = node.address or ""
        self.message_limit = message_limit
        self._channel = open_channel(self._address, node.name, credentials, message_limit)
        self._stub = wire_pb2_grpc.StageServiceStub(self._channel)
        self._metadata = token_metadata(token)

    @property
    def address(self) -> str:
        return self._address

    async def assign(self, assignment: Assignment) -> bool:
        """Assign the stage; False if the node lacks its file (upload it, then assign again)."""
        reply = await self._call("stage assignment", self._stub.Assign(
            encode_assignment(assignment), metadata=self._metadata, timeout=CONTROL_TIMEOUT))
        return decode_assign_reply(reply)

    async def put_stage(self, sha256: str, data: bytes) -> None:
        piece = max(1, min(UPLOAD_CHUNK, self.message_limit - HEADER_ROOM))

        async def chunks() -> AsyncIterator[wire_pb2.StageChunk]:
            for chunk in encode_stage_chunks(sha256, data, piece):
                yield chunk

        await self._call("stage upload", self._stub.PutStage(chunks(), metadata=self._metadata,
                                                             timeout=CONTROL_TIMEOUT))

    async def profile(self, job: ProfileJob) -> NodeProfile:
        reply = await self._call("profile request", self._stub.Profile(
            encode_profile_job(job), metadata=self._metadata, timeout=PROFILE_TIMEOUT))
        return decode_node_profile(reply)

    async def health(self, timeout: float) -> NodeHealth:
        reply = await self._call("health call", self._stub.Health(
            wire_pb2.HealthRequest(), metadata=self._metadata, timeout=timeout))
        return decode_health(reply)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise NodeBusyError(f"{what} to {self.node.name} turned away for now ({detail})") from exc
            cause = refusal_cause(exc.code(), exc.details() or "", self.node.name)
            if cause is not None:
                raise ClusterError(f"node {self.node.name} refused the {what}: {cause} ({detail}; the node is at "
                                   f"{self.address})") from exc
            raise NodeUnavailableError(f"{what} to {self.node.name} at {self.address} failed ({detail})") from exc

    async def close(self) -> None:
        await self._channel.close(grace=None)
