from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KvAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_ACTION_UNSPECIFIED: _ClassVar[KvAction]
    KV_ACTION_PRESERVE: _ClassVar[KvAction]
    KV_ACTION_SWAP: _ClassVar[KvAction]
    KV_ACTION_DISCARD: _ClassVar[KvAction]

class KvState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_STATE_UNSPECIFIED: _ClassVar[KvState]
    KV_STATE_NONE: _ClassVar[KvState]
    KV_STATE_RESIDENT: _ClassVar[KvState]
    KV_STATE_SWAPPED: _ClassVar[KvState]
    KV_STATE_DISCARDED: _ClassVar[KvState]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_ARRIVED: _ClassVar[JobState]
    JOB_STATE_READY: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_API_WAIT: _ClassVar[JobState]
    JOB_STATE_FINISHED: _ClassVar[JobState]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_TOOL_CALL: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
KV_ACTION_UNSPECIFIED: KvAction
KV_ACTION_PRESERVE: KvAction
KV_ACTION_SWAP: KvAction
KV_ACTION_DISCARD: KvAction
KV_STATE_UNSPECIFIED: KvState
KV_STATE_NONE: KvState
KV_STATE_RESIDENT: KvState
KV_STATE_SWAPPED: KvState
KV_STATE_DISCARDED: KvState
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_ARRIVED: JobState
JOB_STATE_READY: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_API_WAIT: JobState
JOB_STATE_FINISHED: JobState
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_TOOL_CALL: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_tokens", "seed", "stop", "json_schema")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    json_schema: str
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., json_schema: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_wait_s", "ttft_s", "duration_s", "prefill_tokens", "decode_tokens")
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_wait_s: float
    ttft_s: float
    duration_s: float
    prefill_tokens: int
    decode_tokens: int
    def __init__(self, queue_wait_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., prefill_tokens: _Optional[int] = ..., decode_tokens: _Optional[int] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("step_index", "tokens", "decode_tokens", "context_tokens_read", "duration_s")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_READ_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    tokens: int
    decode_tokens: int
    context_tokens_read: int
    duration_s: float
    def __init__(self, step_index: _Optional[int] = ..., tokens: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., context_tokens_read: _Optional[int] = ..., duration_s: _Optional[float] = ...) -> None: ...
