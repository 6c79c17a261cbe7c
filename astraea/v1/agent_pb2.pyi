from astraea.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ToolCallPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_CALL_PHASE_UNSPECIFIED: _ClassVar[ToolCallPhase]
    TOOL_CALL_PHASE_START: _ClassVar[ToolCallPhase]
    TOOL_CALL_PHASE_END: _ClassVar[ToolCallPhase]
TOOL_CALL_PHASE_UNSPECIFIED: ToolCallPhase
TOOL_CALL_PHASE_START: ToolCallPhase
TOOL_CALL_PHASE_END: ToolCallPhase

class StartJobRequest(_message.Message):
    __slots__ = ("job_id", "category")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    category: str
    def __init__(self, job_id: _Optional[str] = ..., category: _Optional[str] = ...) -> None: ...

class StartJobResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RunSegmentRequest(_message.Message):
    __slots__ = ("job_id", "prompt_text", "prompt_token_ids", "sampling", "next_tool_category", "resume_from_index", "expected_output_tokens", "expected_tool_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOOL_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOOL_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    prompt_text: str
    prompt_token_ids: _common_pb2.TokenIds
    sampling: _common_pb2.SamplingParams
    next_tool_category: str
    resume_from_index: int
    expected_output_tokens: int
    expected_tool_s: float
    def __init__(self, job_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., next_tool_category: _Optional[str] = ..., resume_from_index: _Optional[int] = ..., expected_output_tokens: _Optional[int] = ..., expected_tool_s: _Optional[float] = ...) -> None: ...

class RunSegmentEvent(_message.Message):
    __slots__ = ("tokens", "done")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenEvent
    done: SegmentDone
    def __init__(self, tokens: _Optional[_Union[TokenEvent, _Mapping]] = ..., done: _Optional[_Union[SegmentDone, _Mapping]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("first_index", "token_ids", "text")
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    first_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, first_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class SegmentDone(_message.Message):
    __slots__ = ("finish_reason", "timings", "segment_index")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    timings: _common_pb2.Timings
    segment_index: int
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., segment_index: _Optional[int] = ...) -> None: ...

class ReportToolCallRequest(_message.Message):
    __slots__ = ("job_id", "phase", "category")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    phase: ToolCallPhase
    category: str
    def __init__(self, job_id: _Optional[str] = ..., phase: _Optional[_Union[ToolCallPhase, str]] = ..., category: _Optional[str] = ...) -> None: ...

class ReportToolCallResponse(_message.Message):
    __slots__ = ("observed_duration_s",)
    OBSERVED_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    observed_duration_s: float
    def __init__(self, observed_duration_s: _Optional[float] = ...) -> None: ...

class EndJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class EndJobResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: JobStatus
    def __init__(self, status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "category", "state", "level", "kv_state", "worker_id", "segment_index", "context_tokens", "pending_tokens", "generated_tokens", "arrival_unix_s", "waiting_s", "finished_unix_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    KV_STATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    WAITING_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    category: str
    state: _common_pb2.JobState
    level: int
    kv_state: _common_pb2.KvState
    worker_id: int
    segment_index: int
    context_tokens: int
    pending_tokens: int
    generated_tokens: int
    arrival_unix_s: float
    waiting_s: float
    finished_unix_s: float
    def __init__(self, job_id: _Optional[str] = ..., category: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., level: _Optional[int] = ..., kv_state: _Optional[_Union[_common_pb2.KvState, str]] = ..., worker_id: _Optional[int] = ..., segment_index: _Optional[int] = ..., context_tokens: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., arrival_unix_s: _Optional[float] = ..., waiting_s: _Optional[float] = ..., finished_unix_s: _Optional[float] = ...) -> None: ...
