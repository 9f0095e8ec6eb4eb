"""The cluster file: nodes, links, batching, retries, security and the registry."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from splitexit.config.base import SpecModel, did_you_mean, seconds_from, written_duration
from splitexit.config.codec_names import AUTO, parse_codec
from splitexit.config.data_plane import DataPlaneSpec
from splitexit.config.etcd import ClusterTLS, EtcdSpec
from splitexit.config.metrics import MetricsSpec
from splitexit.cuts import MODEL_INPUT, MODEL_OUTPUT, Cut
from splitexit.errors import ConfigError
from splitexit.links import in_series
from splitexit.units import parse_bandwidth, parse_size

DEFAULT_CODEC = "raw"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$")


def _check_codec(name: str) -> str:
    """A codec name as `config/codec_names.py` defines them, or ``auto`` (measured per link)."""
    normal = name.strip().lower()
    if normal != AUTO:
        try:
            parse_codec(normal)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
    return normal


DEFAULT_WINDOW = 16
#: Characters a cluster token needs at least (a shorter one is too easy to guess).
MIN_TOKEN_LENGTH = 16
DEFAULT_MESSAGE_LIMIT = 64 * 1024 * 1024


class NodeSpec(SpecModel):
    """One machine of the chain. The edge runs the first stage and opens every connection."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    role: Literal["edge", "worker"] = "worker"
    address: str | None = Field(None, description="host:port a worker listens on (not needed for the edge)")
    slowdown: float = Field(1.0, ge=1.0, description="stretch compute time by this factor (emulate a slow device)")
    tier: int | None = Field(None, ge=1, description="position in the chain (workers of one tier are replicas); "
                                                    "default: one after the previous node's")
    ends_at: Cut | str | None = Field(None, description="cut (id or module) where this node's stage ends; "
                                                       "`input` on the edge: send the input unprocessed")
    metrics: MetricsSpec | None = Field(None, description="serve Prometheus /metrics: {address: HOST:PORT}")
    device: str = Field("auto", description="where the stage computes: auto (the first accelerator, else cpu), "
                                            "cpu, cuda, cuda:N, mps; tensors on the wire stay on the CPU")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="compute dtype (autocast); the wire keeps "
                                                                       "each tensor's declared dtype")
    compile: Literal["off", "default", "reduce-overhead"] = Field(
        "off", description="torch.compile the stage (batches padded to a few sizes, compiled when the stage "
                           "loads); reduce-overhead (CUDA graphs) needs a GPU device")
    pin_memory: bool = Field(False, description="read received batches into page-locked memory and copy them to "
                                                "the GPU on a side stream (CUDA devices; with auto, only where "
                                                "it finds one)")
    data_port: int | None = Field(None, ge=0, le=65535, description="port of the data plane (batches and results), "
                                                                  "on the address's host; default: any free one, "
                                                                  "announced to upstream nodes through Health")

    @model_validator(mode="before")
    @classmethod
    def _metrics_port_moved(cls, data: object) -> object:
        if isinstance(data, dict) and "metrics_port" in data:
            raise ValueError(f"`metrics_port: {data['metrics_port']}` is now `metrics: {{address: "
                             f"127.0.0.1:{data['metrics_port']}}}` (any host with security.tls)")
        return data

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} is none of auto, cpu, cuda, cuda:N (N a GPU index), mps")
        return value

    @field_validator("ends_at")
    @classmethod
    def _boundary(cls, value: Cut | str | None) -> Cut | str | None:
        """``input`` is the model's boundary (:data:`~splitexit.cuts.MODEL_INPUT`), not a module's name."""
        if value == MODEL_OUTPUT:
            raise ValueError("a stage ends at the output only on the last tier, which leaves `ends_at` unset")
        return MODEL_INPUT if value == MODEL_INPUT else value

    @model_validator(mode="after")
    def _worker_has_address(self) -> NodeSpec:
        if self.role == "edge" and self.tier not in (None, 0):
            raise ValueError(f"the edge {self.name!r} is tier 0; remove its `tier`")
        if self.role == "worker":
            host, sep, port = (self.address or "").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"worker {self.name!r} needs an address like 127.0.0.1:50061, got {self.address!r}")
        return self


class LinkChange(SpecModel):
    """From ``at`` seconds after a link first carried a message in this process, it has this bandwidth and/or
    latency: experiments with a network that changes mid-run (the planner is not told; it must measure)."""

    at: float = Field(ge=0, description="seconds; a file needs the unit: 5s")
    bandwidth: float | None = Field(None, description="bits per second from then on (unset: unchanged)")
    latency: float | None = Field(None, ge=0, description="one-way seconds from then on (unset: unchanged)")

    @field_validator("at", "latency", mode="before")
    @classmethod
    def _duration(cls, value: str | float | None, info: ValidationInfo) -> float | None:
        return None if value is None else seconds_from(value, info)

    @field_serializer("at", "latency", when_used="json")
    def _duration_out(self, seconds: float | None) -> str | None:
        return written_duration(seconds)

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, value: str | float | None) -> float | None:
        return None if value is None else parse_bandwidth(value)


class LinkSpec(SpecModel):
    """One hop between neighbours, emulated inside the sender when any of its effects is set."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: str = Field(alias="from")
    target: str = Field(alias="to")
    bandwidth: float | None = Field(None, description="bits per second; YAML takes 20Mbit, 1Gbit, ...")
    latency: float = Field(0.0, ge=0, description="one-way seconds; a file needs the unit: 10ms")
    jitter: float = Field(0.0, ge=0, description="seconds of uniform random extra latency")
    loss: float = Field(0.0, ge=0, lt=1, description="fraction of messages that need a retransmission")
    codec: str = Field(DEFAULT_CODEC, description="raw, fp16, bf16, int8, int8c, +lz4/+zstd, or auto")
    changes: tuple[LinkChange, ...] = Field((), description="emulated changes over time, in order of `at`")

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        return _check_codec(value)

    @field_validator("changes")
    @classmethod
    def _in_order(cls, value: tuple[LinkChange, ...]) -> tuple[LinkChange, ...]:
        if [c.at for c in value] != sorted(c.at for c in value):
            raise ValueError("link changes must be listed in order of `at`")
        return value

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, value: str | float | None) -> float | None:
        return None if value is None else parse_bandwidth(value)

    @field_validator("latency", "jitter", mode="before")
    @classmethod
    def _duration(cls, value: str | float, info: ValidationInfo) -> float:
        return seconds_from(value, info)

    @field_serializer("latency", "jitter", when_used="json")
    def _duration_out(self, seconds: float) -> str | None:
        return written_duration(seconds)

    @property
    def emulated(self) -> bool:
        return (self.bandwidth is not None or self.latency > 0 or self.jitter > 0 or self.loss > 0
                or bool(self.changes))

    def conditions(self, elapsed: float) -> tuple[float | None, float]:
        """Bandwidth and latency ``elapsed`` seconds after the link started, with its changes applied."""
        bandwidth, latency = self.bandwidth, self.latency
        for change in self.changes:
            if change.at > elapsed:
                break
            bandwidth = change.bandwidth if change.bandwidth is not None else bandwidth
            latency = change.latency if change.latency is not None else latency
        return bandwidth, latency


class BatchingSpec(SpecModel):
    """Micro-batching at every stage: wait up to ``max_wait`` for up to ``max_batch`` rows."""

    max_batch: int = Field(8, ge=1, le=4096)
    max_wait: float = Field(0.002, ge=0, description="seconds; a file needs the unit: 2ms")

    @field_validator("max_wait", mode="before")
    @classmethod
    def _duration(cls, value: str | float, info: ValidationInfo) -> float:
        return seconds_from(value, info)

    @field_serializer("max_wait", when_used="json")
    def _duration_out(self, seconds: float) -> str | None:
        return written_duration(seconds)


class RetryPolicy(SpecModel):
    """How the entry sends a request again when its route failed (a node died holding it, or no route yet).

    Every field is seconds; a file needs the unit (``timeout: 60s``)."""

    first_wait: float = Field(0.02, gt=0, description="seconds before the first resend; doubles each time")
    max_wait: float = Field(1.0, gt=0, description="longest wait between two sends")
    timeout: float = Field(60.0, gt=0, description="after this long the request is reported as failed")
    attempt_timeout: float = Field(10.0, gt=0, description="an attempt with no answer after this long is sent again "
                                                           "(a stalled node holds it)")

    @field_validator("first_wait", "max_wait", "timeout", "attempt_timeout", mode="before")
    @classmethod
    def _duration(cls, value: str | float, info: ValidationInfo) -> float:
        return seconds_from(value, info)

    @field_serializer("first_wait", "max_wait", "timeout", "attempt_timeout", when_used="json")
    def _duration_out(self, seconds: float) -> str | None:
        return written_duration(seconds)


class SecuritySpec(SpecModel):
    """Who may talk to a node. Without ``tls`` nodes speak plain text, which they allow on loopback only."""

    tls: str | None = Field(None, description="directory with ca.pem and <node>.pem/.key (`splitexit certs`)")
    token: str | None = Field(None, min_length=MIN_TOKEN_LENGTH, description="shared secret every stream must present")
    token_file: str | None = Field(None, description="file holding the token (kept out of the cluster file)")

    @model_validator(mode="after")
    def _one_token_source(self) -> SecuritySpec:
        if self.token and self.token_file:
            raise ValueError("give `token` or `token_file`, not both")
        return self


class ClusterSpec(SpecModel):
    """A cluster file: the chain of nodes, the links between them, and how requests flow."""

    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    package: str | None = Field(None, description="model package every node serves (relative to the file)")
    codec: str = Field(DEFAULT_CODEC, description="codec for links that do not name one")
    batching: BatchingSpec = BatchingSpec()
    window: int = Field(DEFAULT_WINDOW, ge=1, le=65536, description="requests in flight from the entry")
    message_limit: int = Field(DEFAULT_MESSAGE_LIMIT, ge=1024,
                               description="largest gRPC (control) message: stage uploads travel in chunks of it")
    data_plane: DataPlaneSpec = DataPlaneSpec()
    security: SecuritySpec = SecuritySpec()
    registry: Literal["embedded"] | EtcdSpec = Field("embedded", description="where nodes register: `embedded` "
                                                     "(in the entry's process, one machine) or an etcd")
    retry: RetryPolicy = RetryPolicy()
    fallback: Literal["none", "exit", "local"] = Field(
        "none", description="what answers a request the chain has not answered when 90% of retry.timeout has "
                            "passed: none (it fails at the timeout), exit (the edge's deepest exit), local (the "
                            "edge runs the whole model); with exit or local also, at once, rows a full worker has "
                            "no room for (overloaded); such records say fallback and why")
    trusted_models: tuple[str, ...] = Field((), description="`module:factory` models nodes may build from their "
                                                            "own code for stage files that carry no graph "
                                                            "(built-ins and torchvision always)")

    #: every edge of the file, kept in a view of one edge (:meth:`for_edge`): those names are never workers
    _all_edges: tuple[str, ...] = PrivateAttr(())

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        return _check_codec(value)

    @field_validator("message_limit", mode="before")
    @classmethod
    def _size(cls, value: str | float) -> int:
        return parse_size(value)

    @model_validator(mode="after")
    def _chain_is_consistent(self) -> ClusterSpec:
        names = [n.name for n in self.nodes]
        workers_from = next((i for i, n in enumerate(self.nodes) if n.role == "worker"), len(self.nodes))
        if workers_from == 0 or any(n.role == "edge" for n in self.nodes[workers_from:]):
            raise ValueError("the edges (role: edge) come first in `nodes`, then the workers")
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        tiers = self.tiers()
        numbers = sorted(tiers)
        if numbers != list(range(len(numbers))):
            raise ValueError(f"tiers must run 0, 1, 2, ... without gaps; the nodes give {numbers}")
        for number, members in tiers.items():
            ends = {n.ends_at for n in members if n.ends_at is not None}
            if len(ends) > 1:
                raise ValueError(f"the replicas of tier {number} ({', '.join(n.name for n in members)}) must agree on "
                                 f"`ends_at`, got {sorted(map(str, ends))}")
        tier = self.tier_by_name()
        for link in self.links:  # links past the next tier are used while the tiers between have no live node
            for end, name in (("from", link.source), ("to", link.target)):
                if name not in tier:
                    raise ValueError(f"link {link.source} -> {link.target} must join a node to one of a later tier, "
                                     f"but `{end}: {name}` is no node of this file{did_you_mean(name, names)} "
                                     f"(nodes: {', '.join(names)})")
            a, b = tier.get(link.source), tier.get(link.target)
            if a is None or b is None or b <= a:
                raise ValueError(f"link {link.source} -> {link.target} must join a node to one of a later tier")
        return self

    @model_validator(mode="after")
    def _cluster_tls_has_certificates(self) -> ClusterSpec:
        """``registry.tls: cluster`` reads ``security.tls``; say so when the file loads, not when a node starts."""
        if isinstance(self.registry, EtcdSpec) and isinstance(self.registry.tls, ClusterTLS) and not self.security.tls:
            raise ValueError("`registry.tls: cluster` uses each node's certificate from `security.tls`, which is not "
                             "set: add `security: {tls: DIR}` (made by `splitexit certs init DIR`), or give "
                             "`registry.tls: {ca: FILE, cert: FILE, key: FILE}`")
        return self

    @model_validator(mode="after")
    def _metrics_beyond_loopback_need_tls(self) -> ClusterSpec:
        for node in self.nodes:
            if node.metrics is not None and not node.metrics.loopback and not self.security.tls:
                raise ValueError(f"node {node.name} would serve its metrics on {node.metrics.address}, beyond "
                                 "loopback, to anyone who can reach it: set `security: {tls: DIR}` (then only "
                                 "holders of a cluster certificate may read them), or use a loopback address "
                                 "such as 127.0.0.1:9100")
        return self

    def tier_by_name(self) -> dict[str, int]:
        """Each node's tier: the edge is 0; a worker without `tier` is one past the node before it."""
        tiers: dict[str, int] = {}
        previous = 0
        for node in self.nodes:
            previous = 0 if node.role == "edge" else (node.tier if node.tier is not None else previous + 1)
            tiers[node.name] = previous
        return tiers

    def tiers(self) -> dict[int, list[NodeSpec]]:
        """Nodes by tier, in file order within a tier."""
        grouped: dict[int, list[NodeSpec]] = {}
        tier = self.tier_by_name()
        for node in self.nodes:
            grouped.setdefault(tier[node.name], []).append(node)
        return dict(sorted(grouped.items()))

    @property
    def edges(self) -> tuple[NodeSpec, ...]:
        """Every edge of the file (``role: edge``), in file order."""
        return tuple(n for n in self.nodes if n.role == "edge")

    @property
    def workers(self) -> tuple[NodeSpec, ...]:
        """Every worker of the file (the nodes after the edges), in file order."""
        return tuple(n for n in self.nodes if n.role == "worker")

    @property
    def edge_names(self) -> frozenset[str]:
        """The names of every edge of the file, also in a view of one edge (nodes must never take them)."""
        return frozenset(self._all_edges or (e.name for e in self.edges))

    @property
    def edge(self) -> NodeSpec:
        """The edge, in a file with one (or a view of one edge, :meth:`for_edge`); with several, ConfigError."""
        return self.for_edge(None).edges[0]

    def for_edge(self, name: str | None) -> ClusterSpec:
        """The cluster as edge ``name`` sees it: that edge, every worker, and the links that do not start at
        another edge. ``None`` picks the only edge; ConfigError names the choices otherwise."""
        edges = [e.name for e in self.edges]
        if name is None:
            if len(edges) == 1:
                return self
            raise ConfigError(f"the cluster file declares {len(edges)} edges ({', '.join(edges)}): say which one "
                              "runs here with `--edge NAME`")
        if name not in edges:
            raise ConfigError(f"--edge {name}: the cluster file has no edge of that name{did_you_mean(name, edges)} "
                              f"(edges: {', '.join(edges)})")
        others = set(edges) - {name}
        view = self.model_copy(update={
            "nodes": tuple(n for n in self.nodes if n.name not in others),
            "links": tuple(link for link in self.links if link.source not in others)})
        view._all_edges = tuple(edges)
        return view

    def link(self, source: str, target: str) -> LinkSpec:
        """The link from ``source`` to ``target``: the file's, else (when tiers between them are skipped) the
        links through each skipped tier's first node in series, else an unemulated one."""
        for link in self.links:
            if (link.source, link.target) == (source, target):
                return link
        tier = self.tier_by_name()
        tiers = self.tiers()
        if source in tier and target in tier and tier[target] > tier[source] + 1:
            path = [source, *(tiers[t][0].name for t in range(tier[source] + 1, tier[target])), target]
            hops = [self.link(a, b) for a, b in zip(path, path[1:])]
            if any(h.emulated for h in hops):
                figures = in_series(hops)  # the first hop's codec; the hops' `changes` are not carried over
                return LinkSpec.model_validate({"from": source, "to": target, "bandwidth": figures.bandwidth,
                                                "latency": figures.latency, "jitter": figures.jitter,
                                                "loss": figures.loss, "codec": hops[0].codec})
        return LinkSpec.model_validate({"from": source, "to": target, "codec": self.codec})

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)
