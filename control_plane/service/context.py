"""The shared state of one control plane and the operations every handler needs.

Everything runs on one asyncio event loop, and every call into the `Scheduler` is synchronous
(no `await` between reading and changing its state), so handlers and the planner never see
the core half-updated: the event loop is the lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc
from opentelemetry import metrics as otel_metrics
from opentelemetry.trace import Tracer

from astraea import wire
from astraea.plan import JobState
from astraea.telemetry import Metrics, get_logger
from astraea.v1 import agent_pb2, common_pb2, worker_pb2
from control_plane.core.job import Job
from control_plane.core.scheduler import Scheduler
from control_plane.service.registry import JobEntry, Registry, SegmentClosed
from control_plane.service.reservations import Reservation
from control_plane.service.stats import ServiceStats
from control_plane.service.tracing import JobTracing

log = get_logger("astraea.control_plane")


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and defaults of the client API, and the clock."""

    # Scheduler seconds per wall second is 1 / time_scale: a control plane driving workers
    # whose simulated engines run `time_scale` times real time sets the same scale, so the
    # scheduler's times (waits, API durations, TTLs) are in the engines' time.
    time_scale: float = 1.0
    default_max_tokens: int = 256
    max_prompt_chars: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_json_schema_chars: int = 64 << 10  # a schema is compiled per segment; bound the work
    max_temperature: float = 2.0  # OpenAI's range; above it sampling is noise
    max_id_chars: int = 256  # job ids and categories
    # A worker silent this long (wall seconds; workers send a heartbeat every second when
    # idle) is dropped and its jobs re-queued; 0 never drops one.
    worker_timeout_s: float = 10.0


class StepObserver(Protocol):
    """Takes the engine step timings workers report (the remote predictor's link)."""

    def observe_steps(self, steps: Iterable[common_pb2.StepTiming]) -> None: ...


class ControlPlane:
    def __init__(self, scheduler: Scheduler, config: ServiceConfig, *, policy: str = "",
                 tracer: Tracer | None = None, metrics: Metrics | None = None,
                 step_observer: StepObserver | None = None) -> None:
        if not config.time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {config.time_scale}")
        self.scheduler = scheduler
        self.config = config
        self.policy = policy
        self.registry = Registry()
        self.tracing = JobTracing(tracer, policy or None)
        scheduler.on_decision = self.tracing.kv_decision
        scheduler.on_admit = self.tracing.admit_decision
        self.metrics = metrics or Metrics(otel_metrics.get_meter("astraea"))
        self.metrics.set_queue_length_source(
            lambda: dict(enumerate(self.scheduler.queue_lengths())))
        self.metrics.set_kv_utilization_source(self._kv_utilization)
        self.stats = ServiceStats()  # event counts and plan latencies (bench-service)
        self._origin = time.monotonic()
        self.step_observer = step_observer
        self._on_change: Callable[[], None] | None = None  # see set_on_change

    # --- clock ----------------------------------------------------------------------------
    def now(self) -> float:
        """Scheduler time: monotonic seconds since start, in engine time (see time_scale)."""
        return (time.monotonic() - self._origin) / self.config.time_scale

    def observe_steps(self, steps: Iterable[common_pb2.StepTiming]) -> None:
        """A worker's engine step timings: forwarded to the step observer (the remote
        predictor's link) if there is one; dropped otherwise (the core has no use for them)."""
        if self.step_observer is not None:
            self.step_observer.observe_steps(steps)

    def _kv_utilization(self) -> dict[int, float]:
        return {w: e.view.utilization for w, e in self.registry.workers.items()
                if e.view.total_blocks}

    def set_on_change(self, callback: Callable[[], None]) -> None:
        """Who `mark_dirty` tells (the planner); set once, where the server is wired."""
        if self._on_change is not None:
            raise RuntimeError("the control plane's on_change callback is already set")
        self._on_change = callback

    def mark_dirty(self) -> None:
        """Something the plan depends on changed: the planner will run."""
        if self._on_change is not None:
            self._on_change()

    # --- to workers -----------------------------------------------------------------------
    def send(self, worker_id: int, actions: Iterable[worker_pb2.PlanAction],
             change: Reservation | None = None) -> bool:
        """Queue actions (already protos) for a worker as one plan; False if it is not
        connected. `change`: what the plan did to the worker's view, reserved until the
        worker reports it applied the plan (see reservations.py)."""
        entry = self.registry.workers.get(worker_id)
        actions = list(actions)
        if entry is None or not actions:
            return False
        entry.outbound.put_nowait(entry.next_plan(actions, change))
        return True

    def abort_on_worker(self, job: Job, reason: str) -> None:
        """Free whatever the job's worker holds for it (running segment, GPU or host KV, or
        just its prefix-cache affinity: an Abort of a job the worker does not hold is a no-op)."""
        if job.worker_id is not None:
            self.send(job.worker_id, [wire.plan_action_to_proto(
                wire.Abort(job.job_id, job.worker_id, reason))])

    # --- job lifecycle --------------------------------------------------------------------
    def finish_job(self, entry: JobEntry, reason: str, cancel: bool, error: bool = False,
                   code: grpc.StatusCode = grpc.StatusCode.CANCELLED) -> None:
        """The job is over: end it in the core (`cancel`: it has not ended there yet), free
        its worker's memory, close a RunSegment still streaming (with status `code`), and drop
        it from the core. `error`: it ended abnormally (its trace's root span gets an error
        status)."""
        job = entry.job
        if cancel and job.state is not JobState.FINISHED:
            self.scheduler.job_cancelled(job.job_id, self.now())
        self.abort_on_worker(job, reason)
        seg = entry.segment
        if seg is not None and not seg.done:
            seg.done = True
            seg.events.put_nowait(SegmentClosed(code, f"job {job.job_id} ended: {reason}"))
        entry.finished_unix_s = time.time()
        entry.transcript, entry.output = [], None  # kept for GetJob: the history is not needed
        self.scheduler.forget_finished(job.job_id)
        self.mark_dirty()
        jct = (job.finished_s or 0.0) - job.arrival_s
        trace_id = self.tracing.trace_id(job.job_id)
        self.tracing.job_finished(job, reason, jct, error)
        self.metrics.record_jct(jct, policy=self.policy, category=job.category)
        log.info("job finished", job_id=job.job_id, reason=reason, jct_s=jct, trace_id=trace_id)

    def job_status(self, entry: JobEntry) -> agent_pb2.JobStatus:
        job = entry.job
        status = agent_pb2.JobStatus(
            job_id=job.job_id, category=job.category, state=wire.job_state_to_proto(job.state),
            level=job.level, kv_state=wire.kv_state_to_proto(job.kv_state),
            segment_index=job.segment_index, context_tokens=job.context_tokens,
            pending_tokens=job.pending_tokens,
            generated_tokens=entry.generated_total, arrival_unix_s=entry.arrival_unix_s,
            waiting_s=job.waiting_now(self.now()))
        if job.worker_id is not None:
            status.worker_id = job.worker_id
        if entry.finished_unix_s is not None:
            status.finished_unix_s = entry.finished_unix_s
        return status

    # --- worker loss ----------------------------------------------------------------------
    def drop_silent_workers(self, now: float) -> list[int]:
        """Drop every worker whose last message is older than `config.worker_timeout_s` at
        `now` (time.monotonic(); a hung process, or a lost host whose connection lingers)."""
        timeout = self.config.worker_timeout_s
        if not timeout > 0:
            return []
        silent = [w for w, e in self.registry.workers.items() if now - e.last_seen > timeout]
        for w in silent:
            entry = self.registry.workers[w]
            entry.drop_reason = (f"worker {w} ({entry.name}) sent nothing for "
                                 f"{now - entry.last_seen:.1f} s (timeout {timeout:g} s): dropped")
            log.warning("worker silent, dropping it", worker_id=w, worker_name=entry.name,
                        silent_s=round(now - entry.last_seen, 2), timeout_s=timeout)
            self.worker_lost(w)
        return silent


    def worker_lost(self, worker_id: int, expected: bool = False) -> None:
        """The worker's stream closed: all KV it held is gone. Running segments are re-queued
        as preempted with a discard (the tokens already streamed count as generated), kept
        jobs become discarded so they may be placed anywhere (`Scheduler.worker_lost`)."""
        entry = self.registry.workers.pop(worker_id, None)
        if entry is None:
            return
        entry.outbound.put_nowait(None)
        generated = {}
        for job_id in self.scheduler.running.get(worker_id, {}):
            seg = self.registry.jobs[job_id].segment
            if seg:  # tokens already streamed count as generated: nothing is sent twice
                generated[job_id] = seg.next_index - seg.admission_base
                seg.generated += generated[job_id]
        self.scheduler.worker_lost(worker_id, self.now(), generated)
        for job_entry in self.registry.jobs.values():  # its histories are gone with it
            if job_entry.history_worker == worker_id:
                job_entry.history_worker = None
        (log.info if expected else log.warning)(
            "worker disconnected" if expected else "worker lost",
            worker_id=worker_id, worker_name=entry.name)
        self.mark_dirty()
