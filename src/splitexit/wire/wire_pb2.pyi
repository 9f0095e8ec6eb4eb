from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_UNSPECIFIED: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_LZ4: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
ENCODING_UNSPECIFIED: Encoding
ENCODING_RAW: Encoding
ENCODING_FP16: Encoding
ENCODING_BF16: Encoding
ENCODING_INT8: Encoding
COMPRESSION_UNSPECIFIED: Compression
COMPRESSION_NONE: Compression
COMPRESSION_LZ4: Compression
COMPRESSION_ZSTD: Compression

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "encoding", "compression", "scale", "zero_point", "channel_axis", "encoded_size", "payload_size")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_AXIS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    compression: Compression
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[float]
    channel_axis: int
    encoded_size: int
    payload_size: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[float]] = ..., channel_axis: _Optional[int] = ..., encoded_size: _Optional[int] = ..., payload_size: _Optional[int] = ...) -> None: ...

class Stamp(_message.Message):
    __slots__ = ("node", "event", "time")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    node: str
    event: str
    time: float
    def __init__(self, node: _Optional[str] = ..., event: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class BatchHeader(_message.Message):
    __slots__ = ("plan_version", "request_ids", "tensors", "trace")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    request_ids: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    trace: _containers.RepeatedCompositeFieldContainer[Stamp]
    def __init__(self, plan_version: _Optional[int] = ..., request_ids: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., trace: _Optional[_Iterable[_Union[Stamp, _Mapping]]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("sender", "plan_version", "token")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    sender: str
    plan_version: int
    token: str
    def __init__(self, sender: _Optional[str] = ..., plan_version: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node", "credits", "max_rows")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    node: str
    credits: int
    max_rows: int
    def __init__(self, node: _Optional[str] = ..., credits: _Optional[int] = ..., max_rows: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    def __init__(self, batches: _Optional[int] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("request_id", "exit", "prediction", "confidence", "logits", "node", "trace")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    exit: int
    prediction: int
    confidence: float
    logits: _containers.RepeatedScalarFieldContainer[float]
    node: str
    trace: _containers.RepeatedCompositeFieldContainer[Stamp]
    def __init__(self, request_id: _Optional[int] = ..., exit: _Optional[int] = ..., prediction: _Optional[int] = ..., confidence: _Optional[float] = ..., logits: _Optional[_Iterable[float]] = ..., node: _Optional[str] = ..., trace: _Optional[_Iterable[_Union[Stamp, _Mapping]]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("request_ids", "code", "message", "node")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[int]
    code: str
    message: str
    node: str
    def __init__(self, request_ids: _Optional[_Iterable[int]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Up(_message.Message):
    __slots__ = ("results", "errors")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkBytes(_message.Message):
    __slots__ = ("source", "target", "raw_bytes", "wire_bytes", "messages", "rows", "bandwidth_bps")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    raw_bytes: int
    wire_bytes: int
    messages: int
    rows: int
    bandwidth_bps: float
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., messages: _Optional[int] = ..., rows: _Optional[int] = ..., bandwidth_bps: _Optional[float] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("node", "ready", "plan_version", "queued", "in_flight", "links", "tier", "stages", "incarnation", "machine", "data_port", "device")
    NODE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node: str
    ready: bool
    plan_version: int
    queued: int
    in_flight: int
    links: _containers.RepeatedCompositeFieldContainer[LinkBytes]
    tier: int
    stages: _containers.RepeatedScalarFieldContainer[str]
    incarnation: str
    machine: str
    data_port: int
    device: str
    def __init__(self, node: _Optional[str] = ..., ready: _Optional[bool] = ..., plan_version: _Optional[int] = ..., queued: _Optional[int] = ..., in_flight: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkBytes, _Mapping]]] = ..., tier: _Optional[int] = ..., stages: _Optional[_Iterable[str]] = ..., incarnation: _Optional[str] = ..., machine: _Optional[str] = ..., data_port: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("plan_version", "stage_sha256", "downstream", "codec", "upstream", "edge")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    stage_sha256: str
    downstream: _containers.RepeatedCompositeFieldContainer[Peer]
    codec: str
    upstream: _containers.RepeatedScalarFieldContainer[str]
    edge: str
    def __init__(self, plan_version: _Optional[int] = ..., stage_sha256: _Optional[str] = ..., downstream: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., codec: _Optional[str] = ..., upstream: _Optional[_Iterable[str]] = ..., edge: _Optional[str] = ...) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("missing_stage",)
    MISSING_STAGE_FIELD_NUMBER: _ClassVar[int]
    missing_stage: bool
    def __init__(self, missing_stage: _Optional[bool] = ...) -> None: ...

class StageChunk(_message.Message):
    __slots__ = ("sha256", "total_size", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_size: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutStageReply(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("stage_sha256", "cuts", "batch_sizes", "repeats", "links")
    STAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    stage_sha256: str
    cuts: _containers.RepeatedScalarFieldContainer[int]
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    repeats: int
    links: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, stage_sha256: _Optional[str] = ..., cuts: _Optional[_Iterable[int]] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., repeats: _Optional[int] = ..., links: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class TimingStats(_message.Message):
    __slots__ = ("median", "q1", "q3")
    MEDIAN_FIELD_NUMBER: _ClassVar[int]
    Q1_FIELD_NUMBER: _ClassVar[int]
    Q3_FIELD_NUMBER: _ClassVar[int]
    median: float
    q1: float
    q3: float
    def __init__(self, median: _Optional[float] = ..., q1: _Optional[float] = ..., q3: _Optional[float] = ...) -> None: ...

class BatchTiming(_message.Message):
    __slots__ = ("batch", "seconds")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    seconds: TimingStats
    def __init__(self, batch: _Optional[int] = ..., seconds: _Optional[_Union[TimingStats, _Mapping]] = ...) -> None: ...

class PartTiming(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[BatchTiming]
    def __init__(self, batches: _Optional[_Iterable[_Union[BatchTiming, _Mapping]]] = ...) -> None: ...

class IdleFactor(_message.Message):
    __slots__ = ("gap_s", "factor")
    GAP_S_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    gap_s: float
    factor: float
    def __init__(self, gap_s: _Optional[float] = ..., factor: _Optional[float] = ...) -> None: ...

class LinkFigure(_message.Message):
    __slots__ = ("target", "rtt_s", "bandwidth_bps")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    target: str
    rtt_s: float
    bandwidth_bps: float
    def __init__(self, target: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bandwidth_bps: _Optional[float] = ...) -> None: ...

class ProfileReply(_message.Message):
    __slots__ = ("missing_stage", "machine", "call_overhead", "stage_call", "idle_factors", "segments", "heads", "links")
    MISSING_STAGE_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CALL_OVERHEAD_FIELD_NUMBER: _ClassVar[int]
    STAGE_CALL_FIELD_NUMBER: _ClassVar[int]
    IDLE_FACTORS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    missing_stage: bool
    machine: str
    call_overhead: TimingStats
    stage_call: _containers.RepeatedCompositeFieldContainer[BatchTiming]
    idle_factors: _containers.RepeatedCompositeFieldContainer[IdleFactor]
    segments: _containers.RepeatedCompositeFieldContainer[PartTiming]
    heads: _containers.RepeatedCompositeFieldContainer[PartTiming]
    links: _containers.RepeatedCompositeFieldContainer[LinkFigure]
    def __init__(self, missing_stage: _Optional[bool] = ..., machine: _Optional[str] = ..., call_overhead: _Optional[_Union[TimingStats, _Mapping]] = ..., stage_call: _Optional[_Iterable[_Union[BatchTiming, _Mapping]]] = ..., idle_factors: _Optional[_Iterable[_Union[IdleFactor, _Mapping]]] = ..., segments: _Optional[_Iterable[_Union[PartTiming, _Mapping]]] = ..., heads: _Optional[_Iterable[_Union[PartTiming, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkFigure, _Mapping]]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...
