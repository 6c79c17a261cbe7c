"""The worker's tracing of admissions: one span per Admit, from the plan action applied to
the segment's end, preemption or abort.

Each span is a child of the control plane's ``segment`` span (Admit.trace_context): one
stream carries many jobs' actions, so the stream's own metadata cannot carry the parent.
"""

from __future__ import annotations

from opentelemetry import propagate
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from astraea.plan import Admit
from astraea.telemetry import spans
from worker.backend import SegmentEnded, SegmentInput, SegmentPreempted

ADMISSION_SPAN = "admission"
PREFILL_TOKENS, MAX_TOKENS = "astraea.prefill_tokens", "astraea.max_tokens"
SWAP_IN = "astraea.swap_in"
END_REASON = "astraea.end_reason"


class AdmissionSpans:
    """The open admission span of each job on this worker."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._open: dict[str, Span] = {}  # job id → its open admission span

    def start(self, action: Admit, segment: SegmentInput, trace_context,
              worker_id: int) -> None:
        self.end(action.job_id, "admitted again")  # never leak one
        parent = propagate.extract(dict(trace_context)) if trace_context else None
        self._open[action.job_id] = self.tracer.start_span(
            ADMISSION_SPAN, context=parent, attributes={
                spans.JOB_ID: action.job_id, spans.WORKER_ID: worker_id,
                SWAP_IN: action.swap_in, MAX_TOKENS: segment.max_tokens,
                "astraea.new_tokens": action.new_tokens,
                "astraea.context_tokens": action.context_tokens})

    def end(self, job_id: str, reason: str, error: bool = False, **attrs) -> None:
        span = self._open.pop(job_id, None)
        if span is None:
            return
        span.set_attributes({END_REASON: reason, **attrs})
        if error:
            span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def end_all(self, reason: str) -> None:
        for job_id in list(self._open):
            self.end(job_id, reason, error=True)

    def on_event(self, ev) -> None:
        """A backend event that ends an admission ends its span."""
        if isinstance(ev, SegmentEnded):
            self.end(ev.job_id, "segment ended", **{
                spans.TOKENS: ev.generated_tokens, PREFILL_TOKENS: ev.prefill_tokens,
                spans.TTFT_S: ev.ttft_s})
        elif isinstance(ev, SegmentPreempted):
            self.end(ev.job_id, "preempted", **{
                spans.TOKENS: ev.generated_tokens, spans.KV_ACTION: ev.action.value})
