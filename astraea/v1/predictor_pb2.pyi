from astraea.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EstimateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESTIMATE_SOURCE_UNSPECIFIED: _ClassVar[EstimateSource]
    ESTIMATE_SOURCE_MODEL: _ClassVar[EstimateSource]
    ESTIMATE_SOURCE_PRIOR: _ClassVar[EstimateSource]
ESTIMATE_SOURCE_UNSPECIFIED: EstimateSource
ESTIMATE_SOURCE_MODEL: EstimateSource
ESTIMATE_SOURCE_PRIOR: EstimateSource

class EstimateBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[EstimateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[EstimateRequest, _Mapping]]] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("job_id", "category", "segment_index", "context_tokens", "new_tokens", "elapsed_api_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_API_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    category: str
    segment_index: int
    context_tokens: int
    new_tokens: int
    elapsed_api_s: float
    def __init__(self, job_id: _Optional[str] = ..., category: _Optional[str] = ..., segment_index: _Optional[int] = ..., context_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., elapsed_api_s: _Optional[float] = ...) -> None: ...

class EstimateBatchResponse(_message.Message):
    __slots__ = ("estimates", "api_observations", "output_observations")
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    API_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    estimates: _containers.RepeatedCompositeFieldContainer[Estimate]
    api_observations: int
    output_observations: int
    def __init__(self, estimates: _Optional[_Iterable[_Union[Estimate, _Mapping]]] = ..., api_observations: _Optional[int] = ..., output_observations: _Optional[int] = ...) -> None: ...

class Estimate(_message.Message):
    __slots__ = ("job_id", "output_tokens", "compute_s", "api_total_s", "api_remaining_s", "source")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    API_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    API_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    output_tokens: float
    compute_s: float
    api_total_s: float
    api_remaining_s: float
    source: EstimateSource
    def __init__(self, job_id: _Optional[str] = ..., output_tokens: _Optional[float] = ..., compute_s: _Optional[float] = ..., api_total_s: _Optional[float] = ..., api_remaining_s: _Optional[float] = ..., source: _Optional[_Union[EstimateSource, str]] = ...) -> None: ...

class ObserveRequest(_message.Message):
    __slots__ = ("api_calls", "outputs", "steps")
    API_CALLS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    api_calls: _containers.RepeatedCompositeFieldContainer[ApiObservation]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputObservation]
    steps: _containers.RepeatedCompositeFieldContainer[_common_pb2.StepTiming]
    def __init__(self, api_calls: _Optional[_Iterable[_Union[ApiObservation, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputObservation, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[_common_pb2.StepTiming, _Mapping]]] = ...) -> None: ...

class ApiObservation(_message.Message):
    __slots__ = ("category", "duration_s")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    category: str
    duration_s: float
    def __init__(self, category: _Optional[str] = ..., duration_s: _Optional[float] = ...) -> None: ...

class OutputObservation(_message.Message):
    __slots__ = ("category", "segment_index", "output_tokens")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    category: str
    segment_index: int
    output_tokens: int
    def __init__(self, category: _Optional[str] = ..., segment_index: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class ObserveResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class SaveStateRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveStateResponse(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class LoadStateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
