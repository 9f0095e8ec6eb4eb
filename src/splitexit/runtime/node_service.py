"""A node's gRPC face, the control RPCs: who may call what, and turning each call into our types.

Every call is admitted first (the cluster token, and with TLS a certificate naming a caller allowed to
make it), then decoded into our types (:mod:`~splitexit.runtime.control_messages`) for the
:class:`~splitexit.runtime.node.Node` to act on. Batches do not travel here: they take the data plane
(:mod:`~splitexit.runtime.data_service`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc

from splitexit.errors import IntegrityError, SplitExitError, WireError
from splitexit.runtime.control_messages import (
    decode_assignment,
    decode_profile_job,
    decode_stage_chunk,
    encode_assign_reply,
    encode_health,
    encode_node_profile,
    encode_probe_reply,
)
from splitexit.runtime.refusal_log import RefusalLog, peer_host
from splitexit.runtime.security import token_matches
from splitexit.wire import wire_pb2, wire_pb2_grpc

if TYPE_CHECKING:
    from splitexit.runtime.node import Node

__all__ = ["add_node_service"]

logger = logging.getLogger(__name__)

SERVICE = "splitexit.wire.StageService"

#: Who may make a call: an edge (control), any node of the cluster (probes), or an upstream neighbour.
CONTROL, MEMBER, UPSTREAM = "control", "member", "upstream"
_EXPECTED = {CONTROL: "an edge", MEMBER: "a node of this cluster", UPSTREAM: "an edge or a node of the previous tier"}


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code``; gRPC's abort raises, so nothing after it runs."""
    await context.abort(code, details)
    raise AssertionError("grpc.aio.ServicerContext.abort returned instead of raising")


class _Servicer(wire_pb2_grpc.StageServiceServicer):
    def __init__(self, node: Node):
        self.node = node
        self.refusals = RefusalLog(logger)  # a client retrying in a loop gets a line per kind per 10 s

    async def _admit(self, context: grpc.aio.ServicerContext, what: str, caller: str) -> set[str]:
        """Refuse (and log) a caller without the cluster token or, with TLS, without a certificate naming a node
        that may make this call (``caller``: CONTROL, MEMBER or UPSTREAM). Returns the names the caller's
        certificate carries (empty without TLS)."""
        node = self.node
        peer = context.peer()
        if not token_matches(context.invocation_metadata(), node.cluster.security.token):
            node.metrics.refused("unauthenticated")
            self.refusals.warning(("token", peer_host(peer)), "node %s refused a %s from %s: missing or wrong token",
                                  node.name, what, peer)
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")
        if not node.cluster.security.tls:
            return set()
        names = {n.decode() for n in (context.auth_context().get("x509_common_name") or [])}
        edges = node.cluster.edge_names
        if caller == CONTROL:
            allowed = bool(names & edges)
        elif caller == MEMBER:
            allowed = bool(names & {n.name for n in node.cluster.nodes})
        else:
            allowed = any(n in edges or node.upstream_allowed(n) for n in names)
        if not allowed:
            node.metrics.refused("wrong_peer")
            expected = _EXPECTED[caller]
            self.refusals.warning(("peer", peer_host(peer)),
                                  "node %s refused a %s from %s: certificate names %s, expected %s",
                                  node.name, what, peer, sorted(names) or "nobody", expected)
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"only {expected} may make this call to {node.name}")
        return names

    async def _refuse(self, context: grpc.aio.ServicerContext, what: str, exc: Exception) -> NoReturn:
        self.refusals.warning((what, peer_host(context.peer())), "node %s refused %s: %s", self.node.name, what, exc)
        busy = isinstance(exc, WireError) and exc.code == "busy"  # try again later, not a bad request
        status = grpc.StatusCode.RESOURCE_EXHAUSTED if busy else grpc.StatusCode.INVALID_ARGUMENT
        await _abort(context, status, f"{self.node.name}: {exc}")

    async def Health(self, request: wire_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> wire_pb2.HealthReply:
        await self._admit(context, "health call", UPSTREAM)
        return encode_health(await self.node.health())

    async def Assign(self, request: wire_pb2.AssignRequest, context: grpc.aio.ServicerContext
                     ) -> wire_pb2.AssignReply:
        names = await self._admit(context, "stage assignment", CONTROL)
        if names and request.edge not in names:  # with TLS an edge assigns only its own plans
            self.node.metrics.refused("wrong_peer")
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"a certificate for {', '.join(sorted(names))} may not assign edge {request.edge!r}'s plan")
        try:
            return encode_assign_reply(await self.node.assign(decode_assignment(request)))
        except (SplitExitError, ValueError) as exc:
            await self._refuse(context, f"plan {request.plan_version}", exc)

    async def PutStage(self, requests: AsyncIterator[wire_pb2.StageChunk], context: grpc.aio.ServicerContext
                       ) -> wire_pb2.PutStageReply:
        await self._admit(context, "stage upload", CONTROL)

        async def chunks() -> AsyncIterator[tuple[str, int, bytes]]:
            async for chunk in requests:
                yield decode_stage_chunk(chunk)

        try:
            _, size = await self.node.store_stage(chunks())
        except (WireError, IntegrityError) as exc:
            await self._refuse(context, "a stage upload", exc)
        return wire_pb2.PutStageReply(size=size)

    async def Profile(self, request: wire_pb2.ProfileRequest, context: grpc.aio.ServicerContext
                      ) -> wire_pb2.ProfileReply:
        await self._admit(context, "profile request", CONTROL)
        try:
            return encode_node_profile(await self.node.profile(decode_profile_job(request)))
        except SplitExitError as exc:
            await self._refuse(context, "a profile request", exc)

    async def Probe(self, request: wire_pb2.ProbeRequest, context: grpc.aio.ServicerContext) -> wire_pb2.ProbeReply:
        await self._admit(context, "link probe", MEMBER)
        return encode_probe_reply(request)


def add_node_service(node: Node, server: grpc.aio.Server) -> None:
    """Serve ``node``'s control RPCs on ``server`` (the generated registration, under our own servicer)."""
    servicer = _Servicer(node)
    handlers = {
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=wire_pb2.HealthRequest.FromString,
            response_serializer=wire_pb2.HealthReply.SerializeToString),
        "Assign": grpc.unary_unary_rpc_method_handler(
            servicer.Assign, request_deserializer=wire_pb2.AssignRequest.FromString,
            response_serializer=wire_pb2.AssignReply.SerializeToString),
        "PutStage": grpc.stream_unary_rpc_method_handler(
            servicer.PutStage, request_deserializer=wire_pb2.StageChunk.FromString,
            response_serializer=wire_pb2.PutStageReply.SerializeToString),
        "Profile": grpc.unary_unary_rpc_method_handler(
            servicer.Profile, request_deserializer=wire_pb2.ProfileRequest.FromString,
            response_serializer=wire_pb2.ProfileReply.SerializeToString),
        "Probe": grpc.unary_unary_rpc_method_handler(
            servicer.Probe, request_deserializer=wire_pb2.ProbeRequest.FromString,
            response_serializer=wire_pb2.ProbeReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
