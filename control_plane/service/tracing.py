"""The spans of each job's trace in the live control plane.

One trace per job: ``job`` (StartJob to the job's end) with a ``segment`` child per
RunSegment (submission to its done event) and an ``api_wait`` child per tool call (the
segment's end to the next submission). When the client sent a trace context with StartJob,
``job`` continues the client's trace. Each Admit carries the segment span's context to the
worker, whose ``admission`` span is then its child (see `worker/process.py`).

The handlers call these hooks at the moments the core changes the job; the hooks only record.
KV decisions come from the core's `on_decision` callback, which fires inside
`Scheduler.segment_ended` before the ``api_wait`` span exists: the pause decision is held and
recorded on the span when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from astraea.plan import AdmitDecision, JobState, KvDecision
from astraea.telemetry import spans
from astraea.telemetry.propagation import inject_metadata
from control_plane.core.job import Job

END_REASON = "astraea.end_reason"
SWAP_IN = "astraea.swap_in"
ADMITTED_EVENT, PREEMPTED_EVENT, TOOL_EVENT = "admitted", "preempted", "tool_reported"
ADMIT_REFUSED_EVENT = "admit_refused"
REFUSAL_REASON, RETRYABLE = "astraea.refusal_reason", "astraea.retryable"


@dataclass
class _JobSpans:
    job: Span
    segment: Span | None = None
    api_wait: Span | None = None
    segment_admitted: bool = False
    admission_score: float | None = None  # HRRN score of the latest admission (AdmitDecision)
    pending: list[KvDecision] = field(default_factory=list)  # decisions before api_wait exists


class JobTracing:
    """Open spans per job; every hook is a no-op for a job it does not know."""

    def __init__(self, tracer: Tracer | None = None, policy: str | None = None) -> None:
        self.tracer = tracer or trace.get_tracer("astraea.control_plane")
        self.policy = policy
        self._jobs: dict[str, _JobSpans] = {}

    def open_jobs(self) -> int:
        return len(self._jobs)

    def trace_id(self, job_id: str) -> str | None:
        """The job's trace id as logs and trace viewers show it (32 hex digits)."""
        js = self._jobs.get(job_id)
        ctx = js.job.get_span_context() if js else None
        return trace.format_trace_id(ctx.trace_id) if ctx and ctx.is_valid else None

    # --- job ------------------------------------------------------------------------------
    def job_started(self, job: Job, parent: Context | None) -> None:
        self._jobs[job.job_id] = _JobSpans(spans.start_job_span(
            self.tracer, job.job_id, job.category, policy=self.policy, parent=parent))

    def job_finished(self, job: Job, reason: str, jct_s: float, error: bool) -> None:
        js = self._jobs.pop(job.job_id, None)
        if js is None:
            return
        for open_span in (js.segment, js.api_wait):
            if open_span is not None:
                open_span.set_attribute(END_REASON, reason)
                open_span.end()
        js.job.set_attribute(END_REASON, reason)
        if error:
            js.job.set_status(Status(StatusCode.ERROR, reason))
        spans.finish_job(js.job, jct_s=jct_s, final_queue=job.level)

    # --- segment --------------------------------------------------------------------------
    def segment_submitted(self, job: Job, index: int, observed_api_s: float | None) -> None:
        """Ends the API wait (if any) and opens the segment's span."""
        js = self._jobs.get(job.job_id)
        if js is None:
            return
        if js.api_wait is not None:
            spans.finish_api_wait(js.api_wait, observed_s=observed_api_s)
            js.api_wait = None
        js.segment = spans.start_segment_span(self.tracer, job.job_id, queue_level=job.level,
                                              segment_index=index, parent=js.job)
        js.segment_admitted = False

    def api_wait_span(self, job_id: str) -> Span | None:
        js = self._jobs.get(job_id)
        return js.api_wait if js else None

    def segment_admitted(self, job: Job, worker_id: int, swap_in: bool) -> dict[str, str]:
        """Queue level and HRRN score at the first admission (an event for every one);
        returns the trace context to send with the Admit."""
        js = self._jobs.get(job.job_id)
        if js is None or js.segment is None:
            return {}
        seg = js.segment
        ratio = js.admission_score
        if not js.segment_admitted:
            js.segment_admitted = True
            attrs = {spans.QUEUE_LEVEL: job.level, spans.WORKER_ID: worker_id, SWAP_IN: swap_in}
            if ratio is not None:
                attrs[spans.HRRN_SCORE] = float(ratio)
            seg.set_attributes(attrs)
        seg.add_event(ADMITTED_EVENT, {spans.WORKER_ID: worker_id, SWAP_IN: swap_in,
                                       spans.QUEUE_LEVEL: job.level})
        return dict(inject_metadata(trace.set_span_in_context(seg)))

    def segment_preempted(self, job_id: str, generated: int, kv_action: str) -> None:
        js = self._jobs.get(job_id)
        if js is not None and js.segment is not None:
            js.segment.add_event(PREEMPTED_EVENT, {spans.TOKENS: generated,
                                                   spans.KV_ACTION: kv_action})

    def admit_refused(self, job_id: str, worker_id: int, reason: str, retryable: bool) -> None:
        js = self._jobs.get(job_id)
        if js is not None and js.segment is not None:
            js.segment.add_event(ADMIT_REFUSED_EVENT, {spans.WORKER_ID: worker_id,
                                                       REFUSAL_REASON: reason,
                                                       RETRYABLE: retryable})

    def segment_ended(self, job: Job, tokens: int, ttft_s: float,
                      tool_category: str | None, predicted_api_s: float | None) -> None:
        """Closes the segment's span; a tool call opens the ``api_wait`` span, with the pause
        decision the core has just taken."""
        js = self._jobs.get(job.job_id)
        if js is None:
            return
        if js.segment is not None:
            spans.finish_segment(js.segment, tokens=tokens, ttft_s=ttft_s)
            js.segment = None
        if tool_category is None:
            js.pending.clear()
            return
        js.api_wait = spans.start_api_wait_span(
            self.tracer, job.job_id, tool_category, predicted_s=predicted_api_s, parent=js.job)
        for i, decision in enumerate(js.pending):
            spans.record_kv_decision(js.api_wait, decision, set_attributes=i == 0)
        js.pending.clear()

    def tool_reported(self, job_id: str, phase: str, category: str) -> None:
        span = self.api_wait_span(job_id)
        if span is not None:
            span.add_event(TOOL_EVENT, {"astraea.phase": phase, spans.TOOL_CATEGORY: category})

    # --- the core's decision callbacks ---------------------------------------------------
    def admit_decision(self, decision: AdmitDecision, job: Job) -> None:
        """Fires inside `build_plan`, before the planner sends the Admit and calls
        `segment_admitted`, which records the score on the segment span."""
        js = self._jobs.get(job.job_id)
        if js is not None:
            js.admission_score = decision.score

    def kv_decision(self, decision: KvDecision, job: Job) -> None:
        js = self._jobs.get(job.job_id)
        if js is None:
            return
        if js.api_wait is not None:  # a later eviction during the wait: the action changes
            spans.record_kv_decision(js.api_wait, decision, set_attributes=False)
            js.api_wait.set_attribute(spans.KV_ACTION, decision.action.value)
        elif job.state is JobState.API_WAIT:  # the pause, inside Scheduler.segment_ended
            js.pending.append(decision)
        elif js.segment is not None:  # a ready job's KV evicted before its admission
            spans.record_kv_decision(js.segment, decision, set_attributes=False)
