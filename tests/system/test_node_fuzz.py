"""A running node under 10,000 fuzzed data-plane frames: no crash, no hang, bounded memory, a bad frame
closes at most its own connection, and well-formed batches on a healthy connection are still answered.

The node runs in its own process (LocalCluster); its stage is shipped and assigned by an Entry's
coordinator. The frames are of two lanes (``docs/wire.md``):

* frames that break the protocol (bad magic/version/type/deadline, oversize or lying sizes, payloads on
  control frames, frames before HELLO, bad HELLOs, frames of the wrong direction, more batches than
  credits, a batch id twice): each on a connection of its own (``RAW_LANES`` at once), which the node must
  close within ``CLOSE_TIMEOUT`` (with the right GOODBYE code where it sends one). These are written as
  raw bytes on asyncio streams, so the client's own framing code cannot tidy them up. Where a lie leaves
  the node rightly waiting for more bytes, the test half-closes its side after the frame; a few peers say
  HELLO and hang up at once. A connection refused as ``busy`` (the node still counts closed connections
  whose accepted batches are running) is tried again.
* BATCH frames whose metadata or payload is wrong (mutated, truncated, lying tensor headers, bad UTF-8,
  corrupted compressed data) and PINGs: sent on one long-lived connection that respects credits; the node
  must answer each batch with at least one RESULTS frame, hand its credit back, and keep the connection.

Every ``GOOD_EVERY`` frames a well-formed batch goes on a separate healthy connection (credits respected);
each must be answered with the model's prediction, and so must one on a connection opened at the end.
Health must answer within 1 s at ``HEALTH_AT`` and at the end, the node's RSS at the end must be at most
1.2 times the warm one, and the node must still be running.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from splitexit import EarlyExitNet, ExitPolicy, ModelSource, build_model, save
from splitexit.app.run import ensure_cluster_token
from splitexit.config.codec_names import parse_codec
from splitexit.config.load import load_cluster
from splitexit.control.edge import Entry
from splitexit.control.local_cluster import LocalCluster
from splitexit.cuts import MODEL_INPUT
from splitexit.errors import WireError
from splitexit.runtime.frame_connection import FrameConnection, connect
from splitexit.runtime.hop import RowResult
from splitexit.runtime.result_messages import decode_results
from splitexit.runtime.security import token_metadata
from splitexit.wire import wire_pb2, wire_pb2_grpc
from splitexit.wire.data_messages import batch_frame, encode_tensors
from splitexit.wire.framing import HEADER, MAGIC, VERSION, FrameType
from support import data_port, free_port, rss_kib

pytestmark = pytest.mark.slow

FUZZED = 10_000
GOOD_EVERY = 100
#: Raw connections fuzzed at once (each protocol-breaking frame takes a connection of its own).
RAW_LANES = 3
#: Seconds the node has to close a connection after a frame that breaks the protocol (below hello_timeout,
#: so a node that missed a bad pre-HELLO frame is not rescued by the HELLO timer).
CLOSE_TIMEOUT = 3.0
#: Frame counts at which Health is asked, while the next GOOD_EVERY frames are being sent.
HEALTH_AT = (2_500, 5_000, 7_500)
#: Frame count after which the node's warm RSS is measured (the end's may be at most 1.2 times it).
WARM_AT = 1_000
METADATA_LIMIT = 192 * 1024
#: Larger than any payload limit a node can have (data_plane.max_payload is at most 256 MiB).
HUGE_PAYLOAD = 256 * 1024 * 1024 + 1


def frame(kind: int, metadata: bytes = b"", payload: bytes = b"", *, batch_id: int = 0, deadline: float = 0.0,
          metadata_size: int | None = None, payload_size: int | None = None, magic: bytes = MAGIC,
          version: int = VERSION) -> bytes:
    """A frame's bytes, built by hand: every header field may lie about what follows."""
    header = HEADER.pack(magic, version, kind, 0, batch_id, deadline,
                         len(metadata) if metadata_size is None else metadata_size,
                         len(payload) if payload_size is None else payload_size)
    return header + metadata + payload


def field_bytes(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (numbers < 16, lengths < 128): to write bad UTF-8 by hand."""
    assert number < 16 and len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def parses(kind: type, data: bytes) -> bool:
    try:
        kind.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, whatever upb raises
        return False
    return True


BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"ok\x80")


@dataclass(frozen=True)
class Breaker:
    """A protocol-breaking item: ``data`` on a fresh connection (after HELLO when ``hello``); ``eof``: half-close
    after it (the lie leaves the node waiting for bytes); ``expect``: the GOODBYE code the node must send
    (None: it may just close, as it does on a framing error)."""

    kind: str
    data: bytes
    hello: bool = True
    eof: bool = False
    expect: str | None = None
    hangup: bool = False  # close at once after ``data``, without reading anything


@dataclass(frozen=True)
class BadBatch:
    """A keep-open item for the batch lane: a BATCH with this metadata and payload (or a PING)."""

    kind: str
    metadata: bytes
    payload: bytes
    deadline: float = 0.0
    ping: bool = False


class Fuzzer:
    """Builds the fuzzed items from one valid batch (metadata + raw payload) and the cluster's token."""

    def __init__(self, rng: random.Random, version: int, activation: torch.Tensor, token: str):
        self.rng, self.version, self.token = rng, version, token
        self.raw = encode_tensors((activation,), parse_codec("raw"))
        self.metadata, parts = batch_frame(version, [1], self.raw, [("edge", "sent", time.time())])
        self.payload = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
        self.compressed = {}
        for name in ("raw+lz4", "raw+zstd", "int8+zstd", "fp16+lz4"):
            tensors = encode_tensors((activation,), parse_codec(name))
            metadata, parts = batch_frame(version, [1], tensors, [])
            self.compressed[name] = (metadata, b"".join(bytes(memoryview(p).cast("B")) for p in parts))
        self.hello = wire_pb2.Hello(sender="edge", plan_version=version, token=token).SerializeToString()
        self.breakers: dict[str, tuple[int, Callable[[], Breaker]]] = {
            "truncated_header": (6, self.truncated_header),
            "metadata_longer": (5, self.metadata_longer),
            "metadata_shorter": (5, self.metadata_shorter),
            "payload_longer": (5, self.payload_longer),
            "payload_shorter": (5, self.payload_shorter),
            "huge_metadata_size": (5, self.huge_metadata_size),
            "huge_payload_size": (5, self.huge_payload_size),
            "payload_on_control": (3, self.payload_on_control),
            "bad_magic": (5, self.bad_magic),
            "bad_version": (5, self.bad_version),
            "unknown_type": (5, self.unknown_type),
            "bad_deadline": (3, self.bad_deadline),
            "garbage": (4, self.garbage),
            "before_hello": (6, self.before_hello),
            "garbage_before_hello": (3, self.garbage_before_hello),
            "hello_bad_protobuf": (4, self.hello_bad_protobuf),
            "hello_bad_utf8": (4, self.hello_bad_utf8),
            "hello_wrong_token": (2, self.hello_wrong_token),
            "hello_hangup": (2, self.hello_hangup),
            "wrong_direction": (4, self.wrong_direction),
            "over_credit": (2, self.over_credit),
            "duplicate_batch_id": (2, self.duplicate_batch_id),
        }
        self.batches: dict[str, tuple[int, Callable[[], BadBatch]]] = {
            "batch_flip_metadata": (8, self.batch_flip_metadata),
            "batch_cut_metadata": (4, self.batch_cut_metadata),
            "batch_grow_metadata": (4, self.batch_grow_metadata),
            "batch_random_metadata": (4, self.batch_random_metadata),
            "batch_flip_payload": (5, self.batch_flip_payload),
            "batch_resize_payload": (4, self.batch_resize_payload),
            "batch_bad_utf8": (4, self.batch_bad_utf8),
            "batch_lying_tensor": (8, self.batch_lying_tensor),
            "batch_bad_ids": (3, self.batch_bad_ids),
            "batch_corrupt_compressed": (5, self.batch_corrupt_compressed),
            "ping": (2, self.ping),
        }
        self.menu = [(name, weight, make) for name, (weight, make) in {**self.breakers, **self.batches}.items()]

    def items(self, count: int) -> list[Breaker | BadBatch]:
        weights = [weight for _, weight, _ in self.menu]
        return [make() for _, _, make in self.rng.choices(self.menu, weights, k=count)]

    # ------------------------------------------------------------------ helpers
    def noise(self, low: int, high: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def batch(self, **fields: object) -> bytes:
        return frame(FrameType.BATCH, self.metadata, self.payload, batch_id=self.rng.randrange(1, 1 << 62),
                     **fields)  # type: ignore[arg-type]

    def flip(self, data: bytes, most: int = 8) -> bytes:
        mutated = bytearray(data)
        for _ in range(self.rng.randint(1, most)):
            mutated[self.rng.randrange(len(mutated))] ^= self.rng.randrange(1, 256)
        return bytes(mutated)

    # ------------------------------------------------------------------ protocol breakers
    def truncated_header(self) -> Breaker:
        return Breaker("truncated_header", self.batch()[:self.rng.randint(1, HEADER.size - 1)], eof=True)

    def metadata_longer(self) -> Breaker:  # the node waits for metadata that never comes
        size = len(self.metadata) + self.rng.randint(1, METADATA_LIMIT - len(self.metadata))
        return Breaker("metadata_longer", self.batch(metadata_size=size), eof=True)

    def metadata_shorter(self) -> Breaker:  # the rest is read as payload, then as a header
        return Breaker("metadata_shorter", self.batch(metadata_size=self.rng.randrange(len(self.metadata))) +
                       bytes(HEADER.size), eof=True)

    def payload_longer(self) -> Breaker:
        size = len(self.payload) + self.rng.randint(1, 64 * 1024)
        return Breaker("payload_longer", self.batch(payload_size=size), eof=True)

    def payload_shorter(self) -> Breaker:
        return Breaker("payload_shorter", self.batch(payload_size=self.rng.randrange(len(self.payload))) +
                       bytes(HEADER.size), eof=True)

    def huge_metadata_size(self) -> Breaker:
        size = self.rng.choice([METADATA_LIMIT + 1, self.rng.randint(METADATA_LIMIT + 1, 2**32 - 1), 2**32 - 1])
        kind = self.rng.choice([FrameType.BATCH, FrameType.PING, FrameType.HELLO])
        return Breaker("huge_metadata_size", frame(kind, metadata_size=size) + self.noise(0, 64))

    def huge_payload_size(self) -> Breaker:
        size = self.rng.choice([HUGE_PAYLOAD, self.rng.randint(HUGE_PAYLOAD, 2**64 - 1), 2**64 - 1])
        return Breaker("huge_payload_size", self.batch(payload_size=size))

    def payload_on_control(self) -> Breaker:
        kind = self.rng.choice([FrameType.PING, FrameType.HELLO, FrameType.CREDIT, FrameType.GOODBYE])
        return Breaker("payload_on_control", frame(kind, payload=self.noise(1, 64)))

    def bad_magic(self) -> Breaker:
        magic = self.rng.choice([b"SXF0", b"SXF2", b"sxf1", b"\x00\x00\x00\x00", b"GET ", b"\x16\x03\x01\x02"])
        return Breaker("bad_magic", self.batch(magic=magic))

    def bad_version(self) -> Breaker:
        return Breaker("bad_version", self.batch(version=self.rng.choice([0, 2, 255, self.rng.randint(2, 255)])))

    def unknown_type(self) -> Breaker:
        kind = self.rng.choice([0, 8, 255, self.rng.randint(8, 255)])
        return Breaker("unknown_type", frame(kind, self.metadata), hello=self.rng.random() < 0.8)

    def bad_deadline(self) -> Breaker:
        deadline = self.rng.choice([math.nan, math.inf, -math.inf, -1e-9, -self.rng.random() * 1e6])
        return Breaker("bad_deadline", self.batch(deadline=deadline))

    def garbage(self) -> Breaker:
        data = self.noise(HEADER.size, 400)
        return Breaker("garbage", data if not data.startswith(MAGIC) else b"X" + data)

    def before_hello(self) -> Breaker:
        kind = self.rng.choice([FrameType.BATCH, FrameType.PING, FrameType.CREDIT, FrameType.RESULTS,
                                FrameType.WELCOME, FrameType.GOODBYE])
        if kind is FrameType.BATCH:
            data = self.batch()
        elif kind is FrameType.CREDIT:
            data = frame(kind, wire_pb2.Credit(batches=1_000_000).SerializeToString())
        elif kind is FrameType.WELCOME:
            data = frame(kind, wire_pb2.Welcome(node="cloud1", credits=64).SerializeToString())
        elif kind is FrameType.GOODBYE:
            data = frame(kind, wire_pb2.Goodbye(code="idle").SerializeToString())
        else:
            data = frame(kind)
        return Breaker("before_hello", data, hello=False, expect="bad_message")

    def garbage_before_hello(self) -> Breaker:
        data = self.noise(HEADER.size, 200)
        return Breaker("garbage_before_hello", data if not data.startswith(MAGIC) else b"X" + data, hello=False)

    def hello_bad_protobuf(self) -> Breaker:
        choice = self.rng.randrange(3)
        if choice == 0:
            metadata = self.noise(1, 100)
        elif choice == 1:
            metadata = self.hello[:self.rng.randrange(1, len(self.hello))]
        else:
            metadata = self.flip(self.hello)
        ok = parses(wire_pb2.Hello, metadata) and wire_pb2.Hello.FromString(metadata).token == self.token
        if ok:  # a flip in the sender or plan: a valid HELLO after all; break it for sure
            metadata += b"\x0a\xff\xff\xff\xff\x0f"
        expect = "unauthenticated" if parses(wire_pb2.Hello, metadata) else "bad_message"
        return Breaker("hello_bad_protobuf", frame(FrameType.HELLO, metadata), hello=False, expect=expect)

    def hello_bad_utf8(self) -> Breaker:
        bad = self.rng.choice(BAD_UTF8)
        if self.rng.random() < 0.5:
            metadata = field_bytes(1, b"ed" + bad) + field_bytes(3, self.token.encode())
        else:
            metadata = field_bytes(1, b"edge") + field_bytes(3, self.token.encode()[:10] + bad)
        assert not parses(wire_pb2.Hello, metadata), metadata
        return Breaker("hello_bad_utf8", frame(FrameType.HELLO, metadata), hello=False, expect="bad_message")

    def hello_wrong_token(self) -> Breaker:
        token = self.rng.choice(["", "x", self.token[:-1], self.token + "x", self.token.upper()])
        if token == self.token:
            token = ""
        metadata = wire_pb2.Hello(sender="edge", token=token).SerializeToString()
        return Breaker("hello_wrong_token", frame(FrameType.HELLO, metadata), hello=False, expect="unauthenticated")

    def hello_hangup(self) -> Breaker:  # a valid HELLO, then gone before the WELCOME
        return Breaker("hello_hangup", frame(FrameType.HELLO, self.hello), hello=False, hangup=True)

    def wrong_direction(self) -> Breaker:
        kind = self.rng.choice([FrameType.HELLO, FrameType.WELCOME, FrameType.RESULTS, FrameType.CREDIT,
                                FrameType.GOODBYE])
        metadata = self.hello if kind is FrameType.HELLO else self.noise(0, 40)
        return Breaker("wrong_direction", frame(kind, metadata), expect="bad_message")

    def over_credit(self) -> Breaker:
        """A flood of batches past the 4 granted, in one write. (A few too many are not a sure violation: the
        node hands a credit back as soon as a batch has run, before it reads the next frame, so it cannot
        tell them from a sender that saw the CREDIT: in a trial six or twelve at once went unnoticed, forty
        and sixty-four were caught every time.)"""
        data = b"".join(frame(FrameType.BATCH, self.metadata, self.payload, batch_id=i) for i in range(1, 65))
        return Breaker("over_credit", data, expect="bad_message")

    def duplicate_batch_id(self) -> Breaker:
        one = self.batch()
        return Breaker("duplicate_batch_id", one + one, expect="bad_message")

    # ------------------------------------------------------------------ bad batches (the connection goes on)
    def batch_flip_metadata(self) -> BadBatch:
        return BadBatch("batch_flip_metadata", self.flip(self.metadata), self.payload)

    def batch_cut_metadata(self) -> BadBatch:
        return BadBatch("batch_cut_metadata", self.metadata[:self.rng.randrange(len(self.metadata))], self.payload)

    def batch_grow_metadata(self) -> BadBatch:
        return BadBatch("batch_grow_metadata", self.metadata + self.noise(1, 64), self.payload)

    def batch_random_metadata(self) -> BadBatch:
        return BadBatch("batch_random_metadata", self.noise(0, 300), self.noise(0, 300))

    def batch_flip_payload(self) -> BadBatch:  # still a valid batch: answered (with NaNs, maybe)
        return BadBatch("batch_flip_payload", self.metadata, self.flip(self.payload, 64),
                        deadline=self.rng.random() * 10)

    def batch_resize_payload(self) -> BadBatch:
        cut = self.rng.random() < 0.5
        payload = self.payload[:self.rng.randrange(len(self.payload))] if cut else self.payload + self.noise(1, 512)
        return BadBatch("batch_resize_payload", self.metadata, payload)

    def batch_bad_utf8(self) -> BadBatch:
        bad = self.rng.choice(BAD_UTF8)
        stamp = field_bytes(1 if self.rng.random() < 0.5 else 2, b"n" + bad) + b"\x19" + struct.pack("<d", 1.0)
        metadata = self.metadata + field_bytes(4, stamp)  # one more trace step, with bad UTF-8
        assert not parses(wire_pb2.BatchHeader, metadata)
        return BadBatch("batch_bad_utf8", metadata, self.payload)

    def batch_lying_tensor(self) -> BadBatch:
        header = wire_pb2.BatchHeader.FromString(self.metadata)
        tensor = header.tensors[0]
        payload = self.payload
        lie = self.rng.randrange(9)
        if lie == 0:
            tensor.shape[:] = [self.rng.choice([2**31, 2**40, 2**62, 2**63 - 1]), *tensor.shape[1:]]
        elif lie == 1:
            tensor.shape[:] = [1, *(self.rng.choice([2**20, 2**31, 2**62]) for _ in tensor.shape[1:])]
        elif lie == 2:
            tensor.shape[:] = [1] * self.rng.randint(9, 40)
        elif lie == 3:
            tensor.shape[:] = [1, *(-x for x in tensor.shape[1:])]
        elif lie == 4:
            tensor.encoded_size = self.rng.choice([0, 1, 2**40, 2**64 - 1])
        elif lie == 5:
            tensor.dtype = self.rng.choice([99, -1, 2**31 - 1])
        elif lie == 6:
            tensor.encoding = self.rng.choice([99, -5])
            tensor.compression = self.rng.choice([0, 99])
        elif lie == 7:  # compressed, says the header; the bytes are raw
            tensor.compression = self.rng.choice([wire_pb2.COMPRESSION_LZ4, wire_pb2.COMPRESSION_ZSTD])
        else:
            tensor.payload_size = self.rng.choice([0, 2**64 - 1, len(payload) + 1])
        if self.rng.random() < 0.3:
            header.tensors.add().CopyFrom(tensor)  # a tensor too many
        return BadBatch("batch_lying_tensor", header.SerializeToString(), payload)

    def batch_bad_ids(self) -> BadBatch:
        header = wire_pb2.BatchHeader.FromString(self.metadata)
        choice = self.rng.randrange(3)
        if choice == 0:
            header.ClearField("request_ids")
        elif choice == 1:
            header.request_ids[:] = [7, 7]
        else:
            header.request_ids[:] = range(self.rng.randint(9, 5000))
        return BadBatch("batch_bad_ids", header.SerializeToString(), self.payload)

    def batch_corrupt_compressed(self) -> BadBatch:
        metadata, payload = self.compressed[self.rng.choice(sorted(self.compressed))]
        if self.rng.random() < 0.3:
            header = wire_pb2.BatchHeader.FromString(metadata)
            header.tensors[0].encoded_size = self.rng.choice([1, 2**40])
            metadata = header.SerializeToString()
        else:
            payload = self.flip(payload, 16)
        return BadBatch("batch_corrupt_compressed", metadata, payload)

    def ping(self) -> BadBatch:
        return BadBatch("ping", b"", b"", ping=True)


@dataclass
class Stats:
    sent: Counter[str] = field(default_factory=Counter)
    goodbyes: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    busy: int = 0  # connections refused as busy (too many from this address) and tried again
    health_s: list[float] = field(default_factory=list)


class Lane:
    """A long-lived data connection that respects credits: batches go out as credit allows; RESULTS and CREDIT
    frames are read as they come. The node must never close it."""

    def __init__(self, name: str, connection: FrameConnection, credits: int):
        self.name, self.connection, self.credits = name, connection, credits
        self.granted = credits
        self.changed = asyncio.Condition()
        self.answered: Counter[int] = Counter()  # batch id -> RESULTS frames
        self.predictions: dict[tuple[int, int], int] = {}
        self.sent: dict[int, str] = {}  # batch id -> what it was
        self.failure: str | None = None
        self.next_id = 1
        self.reader = asyncio.get_running_loop().create_task(self.read())

    @classmethod
    async def open(cls, name: str, host: str, port: int, hello: bytes, stats: Stats) -> Lane:
        connection = await connect(host, port)
        stats.connections += 1
        await connection.send(FrameType.HELLO, hello)
        welcome = await asyncio.wait_for(connection.receive(), 10)
        assert welcome.kind is FrameType.WELCOME, (welcome.kind, welcome.metadata)
        return cls(name, connection, wire_pb2.Welcome.FromString(welcome.metadata).credits)

    async def read(self) -> None:
        try:
            while True:
                frame = await self.connection.receive()
                async with self.changed:
                    if frame.kind is FrameType.CREDIT:
                        self.credits += wire_pb2.Credit.FromString(frame.metadata).batches
                    elif frame.kind is FrameType.RESULTS:
                        assert frame.batch_id in self.sent, f"RESULTS for batch {frame.batch_id}, never sent"
                        self.answered[frame.batch_id] += 1
                        for outcome in decode_results(frame.metadata, "edge"):
                            if isinstance(outcome, RowResult):
                                self.predictions[frame.batch_id, outcome.request_id] = outcome.prediction
                    else:
                        detail = wire_pb2.Goodbye.FromString(frame.metadata) if frame.kind is FrameType.GOODBYE else ""
                        self.failure = f"{self.name}: the node sent {frame.kind.name} {detail}"
                    self.changed.notify_all()
        except (ConnectionError, WireError, AssertionError) as exc:
            async with self.changed:
                self.failure = self.failure or f"{self.name}: connection lost ({exc!r})"
                self.changed.notify_all()

    def check(self) -> None:
        if self.failure is not None:
            recent = list(self.sent.values())[-8:]
            raise AssertionError(f"{self.failure}; the last frames sent on it: {recent}")

    async def send(self, what: str, metadata: bytes, payload: bytes, deadline: float = 0.0) -> int:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.credits > 0 or self.failure is not None), 30)
            except TimeoutError:
                missing = [(b, w) for b, w in self.sent.items() if not self.answered[b]]
                raise AssertionError(f"{self.name}: no credit back for 30 s; unanswered batches: {missing[-10:]}, "
                                     f"last sent: {list(self.sent.items())[-6:]}") from None
            self.check()
            self.credits -= 1
        batch_id, self.next_id = self.next_id, self.next_id + 1
        self.sent[batch_id] = what
        await self.connection.send(FrameType.BATCH, metadata, [payload] if payload else (), batch_id=batch_id,
                                   deadline=deadline)
        return batch_id

    async def ping(self) -> None:
        self.check()
        await self.connection.send(FrameType.PING)

    async def settle(self, timeout: float = 30) -> None:
        """Wait until every batch sent got a RESULTS frame and every credit came back."""
        def settled() -> bool:
            return self.failure is not None or (
                self.credits == self.granted and all(self.answered[b] for b in self.sent))
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(settled), timeout)
            except TimeoutError:
                missing = [(b, w) for b, w in self.sent.items() if not self.answered[b]]
                raise AssertionError(f"{self.name}: {len(missing)} batches unanswered after {timeout} s "
                                     f"(credits {self.credits}/{self.granted}): {missing[:10]}") from None
        self.check()


class RawLane:
    """Protocol-breaking frames, each on a fresh raw connection (asyncio streams, bytes as written)."""

    def __init__(self, host: str, port: int, hello: bytes, stats: Stats):
        self.host, self.port, self.stats = host, port, stats
        self.hello = frame(FrameType.HELLO, hello)

    async def run(self, item: Breaker) -> None:
        """Send ``item`` on a fresh connection; the node must close it. A node refuses connections past its
        per-address limit with GOODBYE ``busy`` before reading anything: those are counted and tried again."""
        for _ in range(200):
            codes = await self.attempt(item)
            if codes != ["busy"]:
                break
            self.stats.busy += 1
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the node refused 200 connections in a row as busy")
        assert "hello_timeout" not in codes, (item.kind, codes)
        if item.expect is not None:
            assert codes == [item.expect], \
                f"{item.kind}: GOODBYE {codes}, expected {item.expect!r}: {item.data[:120].hex()}"
        self.stats.goodbyes.update(codes or ["(closed)"])

    async def attempt(self, item: Breaker) -> list[str]:
        """The GOODBYE codes the node sent before it closed the connection."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.stats.connections += 1
        if item.hangup:
            writer.write(item.data)
            writer.close()
            return []
        try:
            if item.hello:
                writer.write(self.hello)
                kind, metadata = await asyncio.wait_for(read_frame(reader), 10)
                if kind == FrameType.GOODBYE:
                    return [wire_pb2.Goodbye.FromString(metadata).code]
                assert kind == FrameType.WELCOME, (kind, metadata)
            try:
                writer.write(item.data)
                if item.eof:
                    writer.write_eof()
                await writer.drain()
            except OSError:  # ConnectionResetError, or ENOTCONN from write_eof: the node closed already
                pass
            try:
                frames = await asyncio.wait_for(read_until_closed(reader), CLOSE_TIMEOUT)
            except TimeoutError:
                raise AssertionError(f"the node kept a connection open {CLOSE_TIMEOUT} s after a {item.kind} "
                                     f"frame: {item.data[:120].hex()}") from None
        finally:
            writer.close()
        allowed = (FrameType.GOODBYE, FrameType.RESULTS, FrameType.CREDIT)
        assert all(k in allowed for k, _ in frames), (item.kind, frames)
        return [wire_pb2.Goodbye.FromString(m).code for k, m in frames if k == FrameType.GOODBYE]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    _, _, kind, _, _, _, metadata_size, payload_size = HEADER.unpack(await reader.readexactly(HEADER.size))
    metadata = await reader.readexactly(metadata_size)
    await reader.readexactly(payload_size)
    return kind, metadata


async def read_until_closed(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    frames = []
    try:
        while True:
            frames.append(await read_frame(reader))
    except (asyncio.IncompleteReadError, ConnectionError):
        return frames


async def health(address: str, token: str | None) -> float:
    """Seconds the node took to answer Health (a fresh channel); at most 1 s, or it fails."""
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await wire_pb2_grpc.StageServiceStub(channel).Health(
            wire_pb2.HealthRequest(), metadata=token_metadata(token), timeout=1.0)
    assert reply.ready
    return time.perf_counter() - start


def test_ten_thousand_fuzzed_frames(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = EarlyExitNet.from_model(build_model("digits_cnn"), torch.zeros(1, 1, 8, 8),
                                  source=ModelSource(name="digits_cnn", num_classes=10)).eval()
    net.set_policy(ExitPolicy(temperatures=(1.0,) * net.num_exits, thresholds=(2.0,) * len(net.exit_cuts)))
    save(net, tmp_path / "pkg")
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"package": "pkg", "nodes": [
        {"name": "edge", "role": "edge", "ends_at": net.exit_cuts[0].id},
        {"name": "cloud1", "address": f"127.0.0.1:{free_port()}"}]}))
    ensure_cluster_token(cluster_file)
    cluster = load_cluster(cluster_file)
    address = cluster.node("cloud1").address or ""
    token = cluster.security.token or ""
    good_input = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (activation,) = net.graph.segment(MODEL_INPUT, net.exit_cuts[0].id)(good_input)
        expected = int(net(good_input)[-1].argmax(1))
    stats = Stats()

    async def attack(pid: int) -> tuple[int, int, Lane, Lane]:
        entry = Entry(net, cluster)  # its coordinator ships and assigns cloud1's stage
        await entry.start()
        try:
            return await fuzz(pid, entry.placement.version)
        finally:
            await entry.close()

    async def fuzz(pid: int, version: int) -> tuple[int, int, Lane, Lane]:
        fuzzer = Fuzzer(random.Random(7), version, activation, token)
        host, port = address.rpartition(":")[0], await data_port(address, token)
        good = await Lane.open("the good lane", host, port, fuzzer.hello, stats)
        bad = await Lane.open("the bad-batch lane", host, port, fuzzer.hello, stats)
        raw = [RawLane(host, port, fuzzer.hello, stats) for _ in range(RAW_LANES)]

        async def bad_batches(items: list[BadBatch]) -> None:
            for item in items:
                if item.ping:
                    await bad.ping()
                else:
                    await bad.send(item.kind, item.metadata, item.payload, item.deadline)

        async def breakers(lane: RawLane, items: list[Breaker]) -> None:
            for item in items:
                await lane.run(item)

        async def health_meanwhile() -> None:  # asked while the chunk's frames are on their way
            await asyncio.sleep(0.05)
            stats.health_s.append(await health(address, token))

        warm = 0
        for start in range(0, FUZZED, GOOD_EVERY):
            chunk = fuzzer.items(GOOD_EVERY)
            stats.sent.update(item.kind for item in chunk)
            breaking = [item for item in chunk if isinstance(item, Breaker)]
            await asyncio.gather(bad_batches([item for item in chunk if isinstance(item, BadBatch)]),
                                 *(breakers(lane, breaking[i::RAW_LANES]) for i, lane in enumerate(raw)),
                                 *([health_meanwhile()] if start in HEALTH_AT else []))
            request_id = 1_000_000 + start
            await good.send("good", batch_frame(version, [request_id], fuzzer.raw, [])[0], fuzzer.payload)
            done = start + GOOD_EVERY
            if done == WARM_AT:
                await bad.settle()
                await good.settle()
                await asyncio.sleep(0.5)
                warm = rss_kib(pid)
        await bad.settle()
        await good.settle()
        # a connection opened after all that is served like the first
        late = await Lane.open("a late lane", host, port, fuzzer.hello, stats)
        late_id = await late.send("good", batch_frame(version, [7], fuzzer.raw, [])[0], fuzzer.payload)
        await late.settle()
        assert late.predictions == {(late_id, 7): expected}
        await asyncio.sleep(1.0)
        stats.health_s.append(await health(address, token))
        final = rss_kib(pid)
        good.check()
        bad.check()
        for lane in (good, bad, late):
            await lane.connection.close()
            await lane.reader
        return warm, final, good, bad

    with LocalCluster(cluster_file, cluster, log_dir=tmp_path, cache_root=tmp_path / "stages") as local:
        pid = local.processes["cloud1"].pid
        started = time.perf_counter()
        warm, final, good, bad = asyncio.run(attack(pid))
        elapsed = time.perf_counter() - started
        assert local.processes["cloud1"].poll() is None, "the node died"
    tracebacks = (tmp_path / "cloud1.log").read_text().count("Traceback")
    print(f"\n{sum(stats.sent.values())} fuzzed frames in {elapsed:.1f} s: {dict(sorted(stats.sent.items()))}"
          f"\nconnections opened: {stats.connections} ({stats.busy} refused as busy)"
          f"\nthe node's answers on closing: {dict(stats.goodbyes)}"
          f"\nbad batches answered: {len(bad.answered)}/{len(bad.sent)}; good: {len(good.predictions)}/{len(good.sent)}"
          f"\nRSS warm {warm} KiB, final {final} KiB ({final / warm:.3f}x); Health latency "
          f"{', '.join(f'{s * 1000:.0f} ms' for s in stats.health_s)}; tracebacks in the node's log: {tracebacks}")
    assert sum(stats.sent.values()) == FUZZED
    expected_good = {(batch_id, 1_000_000 + (batch_id - 1) * GOOD_EVERY): expected for batch_id in good.sent}
    assert len(expected_good) == FUZZED // GOOD_EVERY
    assert good.predictions == expected_good, "well-formed batches got no answer or a wrong one"
    assert all(s < 1.0 for s in stats.health_s)
    assert final <= warm * 1.2, f"RSS grew from {warm} KiB to {final} KiB"
    assert tracebacks == 0, "a peer's bad frame must be refused in one logged line, not a traceback"
