"""Which registrations the coordinator believes, and at which address and tier.

A registry entry is a claim made by whoever can write the registry, so it is judged against the cluster
file before it gets any traffic:

- A node the file names keeps the file's tier. It is reached at the file's address, unless the cluster
  runs TLS and the registered address answers a handshake with that node's certificate (a node that moved).
- A node the file does not name joins only with TLS, at a tier the file already has, once its address has
  answered a handshake with a certificate for its name. Without TLS nothing can prove who registered it.
- Anything else is dropped and logged once per key and value; it never stops planning for the others.

:func:`judge` is the pure part (the file's rules); the coordinator does the handshakes (:class:`Proofs`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from splitexit.config import ClusterSpec
from splitexit.control.members import NodeInfo
from splitexit.runtime.refusal_log import RefusalLog

__all__ = ["Proofs", "Verdict", "judge"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """How to believe one registration: as ``believe`` (the file's tier; the address per the rules), only
    after a handshake if ``needs_proof``, else as ``otherwise``; or not at all (``refused`` says why)."""

    believe: NodeInfo | None
    needs_proof: bool = False  # its address must first answer a handshake with a certificate for its name
    otherwise: NodeInfo | None = None  # a file node whose registered address fails that: the file's address
    refused: str = ""


def judge(cluster: ClusterSpec, info: NodeInfo) -> Verdict:
    """The cluster file's rules for one registration (see the module docstring)."""
    tls = cluster.security.tls is not None
    tiers = cluster.tier_by_name()
    if info.name in cluster.edge_names:
        return Verdict(None, refused="it names an edge, and edges never register")
    if info.name in tiers:
        filed = info.model_copy(update={"tier": tiers[info.name], "address": cluster.node(info.name).address})
        if info.address == filed.address or not tls:
            return Verdict(filed)
        return Verdict(filed.model_copy(update={"address": info.address}), needs_proof=True, otherwise=filed)
    if not tls:
        return Verdict(None, refused="it is not in the cluster file, and without `security.tls` nothing proves "
                                     "who registered it")
    worker_tiers = sorted({t for t in tiers.values() if t > 0})
    if info.tier not in worker_tiers:
        return Verdict(None, refused=f"tier {info.tier} is not a tier of the cluster file "
                                     f"({', '.join(map(str, worker_tiers))}); registrations join tiers, they never "
                                     "make new ones")
    return Verdict(info, needs_proof=True)


class Proofs:
    """Handshakes already made, by (name, address, incarnation), and refusals already logged."""

    def __init__(self) -> None:
        self._proven: set[tuple[str, str, str]] = set()
        self._refusals = RefusalLog(logger, interval=math.inf)  # once per key and value

    def knows(self, info: NodeInfo) -> bool:
        return (info.name, info.address, info.incarnation) in self._proven

    def record(self, info: NodeInfo) -> None:
        self._proven.add((info.name, info.address, info.incarnation))

    def refuse(self, key: str, value: bytes, reason: str) -> None:
        """Log a refused registration once per key and value (a rogue writer must not flood the log)."""
        self._refusals.warning((key, value.decode(errors="replace")), "not routing to registry entry %s: %s",
                               key, reason)
