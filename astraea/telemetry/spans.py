"""Span names, attribute keys and helpers for each job's trace (docs/design.md, Telemetry).

One trace per job: a root span ``job`` with children ``segment`` (one per segment) and
``api_wait`` (one per tool call). The control plane's ``build_batch`` spans (one per plan) are
traces of their own and carry the queue lengths and the decisions taken. Attribute keys are
namespaced ``astraea.*`` and listed below.

Each span comes in two forms: ``start_X_span(...)`` returns a started span that is *not* made
current (an event-driven service ends it from another handler, after ``finish_X``), and
``X_span(...)`` is a context manager that makes it current and ends it on exit.

``parent`` of ``job`` and ``build_batch``: a `Context` to continue (e.g. one extracted from a
client's gRPC metadata), or None for a new trace. ``parent`` of ``segment`` and ``api_wait``:
the job's span or a `Context`; None means the current span.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer

if TYPE_CHECKING:
    from astraea.plan import KvDecision

# Span names.
JOB, SEGMENT, API_WAIT, BUILD_BATCH = "job", "segment", "api_wait", "build_batch"
KV_DECISION_EVENT = "kv_decision"
PLAN_ACTION_EVENT = "plan_action"

# Attribute keys.
JOB_ID = "astraea.job_id"
CATEGORY = "astraea.category"  # the job's workload category
POLICY = "astraea.policy"
FINAL_QUEUE = "astraea.final_queue"
JCT_S = "astraea.jct_s"
SEGMENT_INDEX = "astraea.segment_index"
QUEUE_LEVEL = "astraea.queue_level"
HRRN_SCORE = "astraea.hrrn_score"  # at admission
TOKENS = "astraea.tokens"  # output tokens of the segment
TTFT_S = "astraea.ttft_s"
WORKER_ID = "astraea.worker_id"
TOOL_CATEGORY = "astraea.tool_category"
API_PREDICTED_S = "astraea.api.predicted_s"
API_OBSERVED_S = "astraea.api.observed_s"
KV_ACTION = "astraea.kv_action"
KV_REASON = "astraea.kv_reason"
KV_INPUT_PREFIX = "astraea.kv.input."  # + the name of each KvDecision input
QUEUE_LENGTHS = "astraea.queue_lengths"  # int[]: ready jobs per MLFQ level, level 0 first
PLAN_ACTIONS = "astraea.plan.actions"
PLAN_PREFIX = "astraea.plan."  # + admit / pause / evict / preempt: count of each
PLAN_EVENTS_DROPPED = "astraea.plan.events_dropped"
STEP = "astraea.step"
ACTION = "astraea.action"  # on a plan_action event: admit / pause / evict / preempt


def _attr(value: Any) -> Any:
    """An OTel attribute value: enums by value, scalars as they are, anything else as str."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _attrs(pairs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _attr(v) for k, v in pairs.items() if v is not None}


def _parent_context(parent: Span | Context | None) -> Context | None:
    if isinstance(parent, Span):
        return trace.set_span_in_context(parent)
    return parent


@contextmanager
def _current(span: Span) -> Iterator[Span]:
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield span


# -- job ---------------------------------------------------------------------------------------

def start_job_span(tracer: Tracer, job_id: str, category: str, *, policy: str | None = None,
                   parent: Context | None = None) -> Span:
    return tracer.start_span(JOB, context=parent if parent is not None else Context(),
                             attributes=_attrs({JOB_ID: job_id, CATEGORY: category,
                                                POLICY: policy}))


def finish_job(span: Span, *, jct_s: float | None = None, final_queue: int | None = None,
               end: bool = True) -> None:
    span.set_attributes(_attrs({JCT_S: jct_s, FINAL_QUEUE: final_queue}))
    if end:
        span.end()


@contextmanager
def job_span(tracer: Tracer, job_id: str, category: str, *, policy: str | None = None,
             parent: Context | None = None) -> Iterator[Span]:
    """The root span of a job's trace, current inside the block; set its result with
    ``finish_job(span, jct_s=..., final_queue=..., end=False)``."""
    with _current(start_job_span(tracer, job_id, category, policy=policy, parent=parent)) as s:
        yield s


# -- segment -----------------------------------------------------------------------------------

def start_segment_span(tracer: Tracer, job_id: str, *, queue_level: int,
                       segment_index: int | None = None, hrrn_score: float | None = None,
                       worker_id: int | None = None,
                       parent: Span | Context | None = None) -> Span:
    return tracer.start_span(SEGMENT, context=_parent_context(parent), attributes=_attrs({
        JOB_ID: job_id, SEGMENT_INDEX: segment_index, QUEUE_LEVEL: queue_level,
        HRRN_SCORE: hrrn_score, WORKER_ID: worker_id}))


def finish_segment(span: Span, *, tokens: int | None = None, ttft_s: float | None = None,
                   end: bool = True) -> None:
    span.set_attributes(_attrs({TOKENS: tokens, TTFT_S: ttft_s}))
    if end:
        span.end()


@contextmanager
def segment_span(tracer: Tracer, job_id: str, *, queue_level: int,
                 segment_index: int | None = None, hrrn_score: float | None = None,
                 worker_id: int | None = None, tokens: int | None = None,
                 ttft_s: float | None = None,
                 parent: Span | Context | None = None) -> Iterator[Span]:
    """One segment: queue level and HRRN score at admission; tokens and TTFT when known
    (here, or later with ``finish_segment(span, ..., end=False)``)."""
    span = start_segment_span(tracer, job_id, queue_level=queue_level,
                              segment_index=segment_index, hrrn_score=hrrn_score,
                              worker_id=worker_id, parent=parent)
    finish_segment(span, tokens=tokens, ttft_s=ttft_s, end=False)
    with _current(span) as s:
        yield s


# -- api_wait ----------------------------------------------------------------------------------

def start_api_wait_span(tracer: Tracer, job_id: str, tool_category: str, *,
                        predicted_s: float | None = None, kv_action: Any = None,
                        parent: Span | Context | None = None) -> Span:
    return tracer.start_span(API_WAIT, context=_parent_context(parent), attributes=_attrs({
        JOB_ID: job_id, TOOL_CATEGORY: tool_category, API_PREDICTED_S: predicted_s,
        KV_ACTION: kv_action}))


def finish_api_wait(span: Span, *, observed_s: float | None = None, end: bool = True) -> None:
    span.set_attributes(_attrs({API_OBSERVED_S: observed_s}))
    if end:
        span.end()


@contextmanager
def api_wait_span(tracer: Tracer, job_id: str, tool_category: str, *,
                  predicted_s: float | None = None, observed_s: float | None = None,
                  kv_action: Any = None, kv_decision: KvDecision | None = None,
                  parent: Span | Context | None = None) -> Iterator[Span]:
    """One tool call: predicted vs observed duration and the KV action taken (a `KvDecision`
    given here is recorded with its inputs, see `record_kv_decision`)."""
    span = start_api_wait_span(tracer, job_id, tool_category, predicted_s=predicted_s,
                               kv_action=kv_action, parent=parent)
    if kv_decision is not None:
        record_kv_decision(span, kv_decision)
    finish_api_wait(span, observed_s=observed_s, end=False)
    with _current(span) as s:
        yield s


# -- build_batch -------------------------------------------------------------------------------

def _queue_lengths(lengths: Sequence[int] | Mapping[int, int]) -> list[int]:
    if isinstance(lengths, Mapping):
        return [int(lengths.get(level, 0)) for level in range(max(lengths, default=-1) + 1)]
    return [int(n) for n in lengths]


@contextmanager
def build_batch_span(tracer: Tracer, queue_lengths: Sequence[int] | Mapping[int, int], *,
                     step: int | None = None, parent: Context | None = None) -> Iterator[Span]:
    """One `build_plan` call: the queue lengths (per MLFQ level, level 0 first) it started
    from; add what it decided with `record_plan` and `record_kv_decision(...,
    set_attributes=False)`."""
    span = tracer.start_span(BUILD_BATCH,
                             context=parent if parent is not None else Context(),
                             attributes=_attrs({STEP: step}))
    span.set_attribute(QUEUE_LENGTHS, _queue_lengths(queue_lengths))
    with _current(span) as s:
        yield s


def record_plan(span: Span, actions: Iterable[Any], *, max_events: int = 64) -> None:
    """Count a plan's actions by type (``astraea.plan.admit`` …) and add one ``plan_action``
    event for each of the first `max_events`, with job, worker and KV action."""
    if not span.is_recording():  # nothing would keep them: do not build them
        return
    counts: Counter[str] = Counter()
    total = 0
    for a in actions:
        kind = type(a).__name__.lower()
        counts[kind] += 1
        total += 1
        if total <= max_events:
            span.add_event(PLAN_ACTION_EVENT, _attrs({
                ACTION: kind, JOB_ID: getattr(a, "job_id", None),
                WORKER_ID: getattr(a, "worker_id", None),
                KV_ACTION: getattr(a, "action", None)}))
    span.set_attribute(PLAN_ACTIONS, total)
    for kind, n in counts.items():
        span.set_attribute(PLAN_PREFIX + kind, n)
    if total > max_events:
        span.set_attribute(PLAN_EVENTS_DROPPED, total - max_events)


# -- KV decisions ------------------------------------------------------------------------------

def kv_decision_attributes(decision: KvDecision) -> dict[str, Any]:
    """``astraea.kv_action``, ``astraea.kv_reason`` and one ``astraea.kv.input.<name>`` per
    input the policy weighed."""
    out = _attrs({JOB_ID: decision.job_id, KV_ACTION: decision.action,
                  KV_REASON: decision.reason})
    out.update(_attrs({KV_INPUT_PREFIX + str(k): v for k, v in decision.inputs.items()}))
    return out


def record_kv_decision(span: Span, decision: KvDecision, *, set_attributes: bool = True) -> None:
    """Add a ``kv_decision`` event carrying the decision and its inputs; with `set_attributes`
    (one decision per span, as on ``api_wait``) also set them as the span's attributes."""
    if not span.is_recording():
        return
    attrs = kv_decision_attributes(decision)
    span.add_event(KV_DECISION_EVENT, attrs)
    if set_attributes:
        span.set_attributes(attrs)
