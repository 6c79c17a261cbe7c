from astraea.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("register", "step_report", "segment_ended", "preempted", "memory", "tokens", "heartbeat", "admit_refused", "drain", "bundle")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ENDED_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ADMIT_REFUSED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    register: Register
    step_report: StepReport
    segment_ended: SegmentEnded
    preempted: Preempted
    memory: MemoryReport
    tokens: TokenBatch
    heartbeat: Heartbeat
    admit_refused: AdmitRefused
    drain: Drain
    bundle: Bundle
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., step_report: _Optional[_Union[StepReport, _Mapping]] = ..., segment_ended: _Optional[_Union[SegmentEnded, _Mapping]] = ..., preempted: _Optional[_Union[Preempted, _Mapping]] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ..., tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., admit_refused: _Optional[_Union[AdmitRefused, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[WorkerMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[WorkerMessage, _Mapping]]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("worker_name", "model", "backend", "kv_capacity_blocks", "block_size", "host_swap_blocks", "max_num_seqs", "max_num_batched_tokens", "profile_name", "needs_history")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_SWAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_NAME_FIELD_NUMBER: _ClassVar[int]
    NEEDS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    model: str
    backend: str
    kv_capacity_blocks: int
    block_size: int
    host_swap_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    profile_name: str
    needs_history: bool
    def __init__(self, worker_name: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., kv_capacity_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., host_swap_blocks: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., profile_name: _Optional[str] = ..., needs_history: _Optional[bool] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.StepTiming]
    def __init__(self, steps: _Optional[_Iterable[_Union[_common_pb2.StepTiming, _Mapping]]] = ...) -> None: ...

class SegmentEnded(_message.Message):
    __slots__ = ("job_id", "generated_tokens", "prefill_tokens", "token_ids", "finish_reason", "ttft_s", "duration_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generated_tokens: int
    prefill_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    ttft_s: float
    duration_s: float
    def __init__(self, job_id: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., ttft_s: _Optional[float] = ..., duration_s: _Optional[float] = ...) -> None: ...

class Preempted(_message.Message):
    __slots__ = ("job_id", "generated_tokens", "action")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generated_tokens: int
    action: _common_pb2.KvAction
    def __init__(self, job_id: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., action: _Optional[_Union[_common_pb2.KvAction, str]] = ...) -> None: ...

class AdmitRefused(_message.Message):
    __slots__ = ("job_id", "reason", "retryable")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    retryable: bool
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("total_blocks", "free_blocks", "block_size", "host_free_blocks", "running_seqs", "max_seqs", "running_context_tokens", "step_time_s", "step_index", "swapping_out_blocks", "applied_plan_seq")
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    SWAPPING_OUT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_PLAN_SEQ_FIELD_NUMBER: _ClassVar[int]
    total_blocks: int
    free_blocks: int
    block_size: int
    host_free_blocks: int
    running_seqs: int
    max_seqs: int
    running_context_tokens: int
    step_time_s: float
    step_index: int
    swapping_out_blocks: int
    applied_plan_seq: int
    def __init__(self, total_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., host_free_blocks: _Optional[int] = ..., running_seqs: _Optional[int] = ..., max_seqs: _Optional[int] = ..., running_context_tokens: _Optional[int] = ..., step_time_s: _Optional[float] = ..., step_index: _Optional[int] = ..., swapping_out_blocks: _Optional[int] = ..., applied_plan_seq: _Optional[int] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobTokens]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobTokens, _Mapping]]] = ...) -> None: ...

class JobTokens(_message.Message):
    __slots__ = ("job_id", "first_index", "token_ids", "text")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    first_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, job_id: _Optional[str] = ..., first_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason", "running_segments")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    running_segments: int
    def __init__(self, reason: _Optional[str] = ..., running_segments: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_s",)
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    sent_unix_s: float
    def __init__(self, sent_unix_s: _Optional[float] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("registered", "plan", "shutdown")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    plan: Plan
    shutdown: Shutdown
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("worker_id", "bundle_max_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    bundle_max_bytes: int
    def __init__(self, worker_id: _Optional[int] = ..., bundle_max_bytes: _Optional[int] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("actions", "seq")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[PlanAction]
    seq: int
    def __init__(self, actions: _Optional[_Iterable[_Union[PlanAction, _Mapping]]] = ..., seq: _Optional[int] = ...) -> None: ...

class PlanAction(_message.Message):
    __slots__ = ("admit", "pause", "evict", "preempt", "abort")
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    admit: Admit
    pause: Pause
    evict: Evict
    preempt: Preempt
    abort: Abort
    def __init__(self, admit: _Optional[_Union[Admit, _Mapping]] = ..., pause: _Optional[_Union[Pause, _Mapping]] = ..., evict: _Optional[_Union[Evict, _Mapping]] = ..., preempt: _Optional[_Union[Preempt, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ...) -> None: ...

class Admit(_message.Message):
    __slots__ = ("job_id", "new_tokens", "context_tokens", "swap_in", "priority", "max_tokens", "sampling", "prompt_text", "prompt_token_ids", "context", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    new_tokens: int
    context_tokens: int
    swap_in: bool
    priority: float
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    prompt_text: str
    prompt_token_ids: _common_pb2.TokenIds
    context: _containers.RepeatedCompositeFieldContainer[ContextPiece]
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, job_id: _Optional[str] = ..., new_tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., swap_in: _Optional[bool] = ..., priority: _Optional[float] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., context: _Optional[_Iterable[_Union[ContextPiece, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ContextPiece(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _common_pb2.TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ...) -> None: ...

class Pause(_message.Message):
    __slots__ = ("job_id", "action")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    action: _common_pb2.KvAction
    def __init__(self, job_id: _Optional[str] = ..., action: _Optional[_Union[_common_pb2.KvAction, str]] = ...) -> None: ...

class Evict(_message.Message):
    __slots__ = ("job_id", "action")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    action: _common_pb2.KvAction
    def __init__(self, job_id: _Optional[str] = ..., action: _Optional[_Union[_common_pb2.KvAction, str]] = ...) -> None: ...

class Preempt(_message.Message):
    __slots__ = ("job_id", "action")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    action: _common_pb2.KvAction
    def __init__(self, job_id: _Optional[str] = ..., action: _Optional[_Union[_common_pb2.KvAction, str]] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason", "drain")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    reason: str
    drain: bool
    def __init__(self, reason: _Optional[str] = ..., drain: _Optional[bool] = ...) -> None: ...
