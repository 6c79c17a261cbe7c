"""The shared state of one control plane and the operations every handler needs.

Everything runs on one asyncio event loop, and every call into the `Scheduler` is synchronous
(no `await` between reading and changing its state), so handlers and the planner never see
the core half-updated: the event loop is the lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from opentelemetry import metrics as otel_metrics
from opentelemetry.trace import Tracer

from astraea import wire
from astraea.plan import JobState, KvState
from astraea.telemetry import Metrics, get_logger
from astraea.v1 import agent_pb2, common_pb2, worker_pb2
from control_plane.core.job import Job
from control_plane.core.scheduler import Scheduler
from control_plane.service.limits import Limits
from control_plane.service.registry import JobEntry, Registry, SegmentCall, SegmentClosed
from control_plane.service.reservations import Reservation
from control_plane.service.stats import ServiceStats
from control_plane.service.tracing import JobTracing

if TYPE_CHECKING:
    from control_plane.service.durable import Durability

log = get_logger("astraea.control_plane")

STEP_RATIO_STEPS = 200  # the step-time ratio gauge weighs about this many recent steps
STEP_RATIO_DECAY = 1 - 1 / STEP_RATIO_STEPS
PLAN_OVERHEAD_BYTES = 1024  # a ControlMessage around a plan's actions: tags, lengths, seq


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


@dataclass(frozen=True)
class ServiceConfig(Limits):
    """Defaults of the client API and the clock, on top of the limits (limits.py)."""

    # Scheduler seconds per wall second is 1 / time_scale: a control plane driving workers
    # whose simulated engines run `time_scale` times real time sets the same scale, so the
    # scheduler's times (waits, API durations, TTLs) are in the engines' time.
    time_scale: float = 1.0
    default_max_tokens: int = 256
    max_temperature: float = 2.0  # OpenAI's range; above it sampling is noise
    # A worker silent this long (wall seconds; workers send a heartbeat every second when
    # idle) is dropped and its jobs re-queued; 0 never drops one.
    worker_timeout_s: float = 10.0
    # How long the durable store (PostgreSQL) may stay unreachable before it fails for good;
    # meanwhile StartJob is refused UNAVAILABLE and streams hold their events.
    store_reconnect_timeout_s: float = 60.0
    # Where SQLite's statements run: "process" (a child process the event loop drives; a
    # writer thread would take the interpreter lock from the loop at every commit) or
    # "thread" (astraea/store/child_writer.py explains). PostgreSQL's always use a thread.
    store_writer: str = "process"


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
        self.metrics.set_kv_decision_source(lambda: self.scheduler.decision_counts)
        self.metrics.set_step_time_ratio_source(self._step_time_ratio)
        self.stats = ServiceStats()  # event counts and plan latencies (bench-service)
        self._origin = time.monotonic()
        self.step_observer = step_observer
        self._on_change: Callable[[], None] | None = None  # see set_on_change
        self._on_settled: Callable[[], None] | None = None
        # Durable state (durable.py); None: in memory only, a restart loses every job.
        self.durable: Durability | None = None

    # --- clock ----------------------------------------------------------------------------
    def now(self) -> float:
        """Scheduler time: monotonic seconds since start, in engine time (see time_scale)."""
        return (time.monotonic() - self._origin) / self.config.time_scale

    def observe_steps(self, steps: Iterable[common_pb2.StepTiming],
                      worker_id: int | None = None) -> None:
        """A worker's engine step timings: set against the cost model's price for the same
        steps (the `astraea_step_time_ratio` gauge: an operator sees a profile that does not
        fit the engine) and forwarded to the step observer (the remote predictor's link)."""
        steps = list(steps)
        worker = self.registry.workers.get(worker_id) if worker_id is not None else None
        if worker is not None:  # the sums leave with the worker's entry
            sums = worker.step_sums
            profile = self.scheduler.profile
            for s in steps:
                predicted = profile.step_time_s(s.tokens, s.context_tokens_read)
                if predicted > 0 and math.isfinite(s.duration_s):
                    # Decayed sums: about the last STEP_RATIO_STEPS steps count.
                    sums[0] = sums[0] * STEP_RATIO_DECAY + s.duration_s
                    sums[1] = sums[1] * STEP_RATIO_DECAY + predicted
        if self.step_observer is not None:
            self.step_observer.observe_steps(steps)

    def _step_time_ratio(self) -> dict[int, float]:
        return {w: e.step_sums[0] / e.step_sums[1] for w, e in self.registry.workers.items()
                if e.step_sums[1] > 0}

    def _kv_utilization(self) -> dict[int, float]:
        return {w: e.view.utilization for w, e in self.registry.workers.items()
                if e.view.total_blocks}

    def set_on_change(self, callback: Callable[[], None],
                      settled: Callable[[], None] | None = None) -> None:
        """Who `mark_dirty` tells (the planner), and who `settled` tells; set once, where
        the server is wired."""
        if self._on_change is not None:
            raise RuntimeError("the control plane's on_change callback is already set")
        self._on_change, self._on_settled = callback, settled

    def mark_dirty(self) -> None:
        """Something the plan depends on changed: the planner will run."""
        if self._on_change is not None:
            self._on_change()

    def settled(self) -> None:
        """A handler has left the state consistent: plan now if a plan is overdue
        (`Planner.plan_if_overdue`)."""
        if self._on_settled is not None:
            self._on_settled()

    def emit(self, seg: SegmentCall, event: object) -> None:
        """Queue a RunSegment event for the segment's client: at once in memory, after the
        writes before it are durable otherwise (durable.py's event gate)."""
        if self.durable is None:
            seg.events.put_nowait(event)
        else:
            self.durable.emit(seg.events, event)

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
        chunks = self._fit_worker_messages(worker_id, actions)
        for i, chunk in enumerate(chunks):
            # The change is held until the last part is applied: between the parts the view
            # looks fuller than it is, never emptier.
            entry.outbound.put_nowait(
                entry.next_plan(chunk, change if i == len(chunks) - 1 else None))
        return bool(chunks)

    def _fit_worker_messages(self, worker_id: int,
                             actions: list[worker_pb2.PlanAction]) -> list[list]:
        """`actions` cut into plans the worker can receive (`worker_max_receive_bytes`); a
        larger message would end the worker's stream, losing every job on it. An action that
        alone does not fit fails its job instead."""
        budget = self.config.worker_max_receive_bytes - PLAN_OVERHEAD_BYTES
        chunks: list[list] = [[]]
        size = 0
        for action in actions:
            n = action.ByteSize() + 8  # the field's tag and length
            if n > budget:
                self._fail_unsendable(worker_id, action, n)
                continue
            if size + n > budget and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(action)
            size += n
        return [c for c in chunks if c]

    def _fail_unsendable(self, worker_id: int, action: worker_pb2.PlanAction, size: int) -> None:
        kind = action.WhichOneof("action")
        job_id = getattr(action, kind).job_id
        log.error("plan action larger than a worker accepts, not sent", worker_id=worker_id,
                  job_id=job_id, action=kind, bytes=size,
                  limit=self.config.worker_max_receive_bytes)
        entry = self.registry.jobs.get(job_id)
        if kind == "admit" and entry is not None and entry.finished_unix_s is None:
            self.finish_job(entry, f"its Admit needs {size} bytes: more than a worker accepts "
                            f"({self.config.worker_max_receive_bytes})", cancel=True,
                            error=True, code=grpc.StatusCode.RESOURCE_EXHAUSTED)

    def abort_on_worker(self, job: Job, reason: str) -> None:
        """Free whatever the job's worker holds for it (running segment, GPU or host KV, or
        just its prefix-cache affinity: an Abort of a job the worker does not hold is a no-op).
        The GPU blocks it frees count as free in the worker's view at once (reserved until a
        report covers the Abort), as the simulator's engine frees them when the job ends:
        otherwise every plan until that report saw them held, and reclaimed KV from jobs in
        tool waits for room that was already there."""
        if job.worker_id is None:
            return
        change = None
        worker = self.registry.workers.get(job.worker_id)
        if worker is not None and job.kv_state is KvState.RESIDENT:
            blocks = worker.view.job_blocks(job.job_id, job.kv_positions)
            if blocks > 0:
                change = Reservation(free_blocks=blocks)
                change.add_to(worker.view)
        self.send(job.worker_id, [wire.plan_action_to_proto(
            wire.Abort(job.job_id, job.worker_id, reason))], change)

    # --- job lifecycle --------------------------------------------------------------------
    def finish_job(self, entry: JobEntry, reason: str, cancel: bool, error: bool = False,
                   code: grpc.StatusCode = grpc.StatusCode.CANCELLED) -> None:
        """The job is over: end it in the core (`cancel`: it has not ended there yet), free
        its worker's memory, close a RunSegment still streaming (with status `code`), and drop
        it from the core. `error`: it ended abnormally (its trace's root span gets an error
        status)."""
        job = entry.job
        if entry.finished_unix_s is not None:
            return  # ended already (a report racing a cancel)
        # Bounded: it travels in an Abort to the worker, in a status to the client and to
        # the log (CancelJob's reason is checked; reasons built from a worker's are not).
        reason = clip(reason, 2 * self.config.max_reason_chars)
        if cancel and job.state is not JobState.FINISHED:
            self.scheduler.job_cancelled(job.job_id, self.now())
        self.abort_on_worker(job, reason)
        seg = entry.segment
        if seg is not None and not seg.done:
            seg.done = True
            seg.events.put_nowait(SegmentClosed(code, f"job {job.job_id} ended: {reason}"))
        entry.finished_unix_s = time.time()
        if self.durable is not None:
            self.durable.job_finished(entry, reason, error)
        self.registry.finished[job.job_id] = time.monotonic()
        self.registry.unfinished_by_client[entry.client] -= 1
        if self.registry.unfinished_by_client[entry.client] <= 0:
            del self.registry.unfinished_by_client[entry.client]
        while len(self.registry.finished) > self.config.max_finished_jobs:
            self._forget_oldest_finished()
        # Kept for GetJob a while (see expire); the history and the prompt are not needed.
        entry.transcript, entry.output, entry.segment = [], None, None
        self.scheduler.forget_finished(job.job_id)
        self.mark_dirty()
        jct = (job.finished_s or 0.0) - job.arrival_s
        trace_id = self.tracing.trace_id(job.job_id)
        self.tracing.job_finished(job, reason, jct, error)
        self.metrics.record_jct(jct, policy=self.policy, category=job.category)
        log.info("job finished", job_id=job.job_id, reason=reason, jct_s=jct, trace_id=trace_id)

    def _forget_oldest_finished(self) -> None:
        job_id, _ = self.registry.finished.popitem(last=False)
        self.registry.jobs.pop(job_id, None)

    def expire(self, now: float) -> None:
        """Housekeeping at `now` (time.monotonic()), run by the server's clock loop: forget
        jobs finished longer than the retention window ago, and end jobs in an API wait whose
        client made no call for longer than the API-wait timeout (their KV is freed)."""
        cfg, finished = self.config, self.registry.finished
        while finished and next(iter(finished.values())) <= now - cfg.finished_retention_s:
            self._forget_oldest_finished()
        timeout = cfg.api_wait_timeout_s
        if not timeout > 0:
            return
        abandoned = [e for e in self.registry.jobs.values()
                     if e.finished_unix_s is None and e.job.state is JobState.API_WAIT
                     and now - e.last_call_s > timeout]
        for entry in abandoned:
            log.warning("API wait abandoned, ending the job", job_id=entry.job.job_id,
                        idle_s=round(now - entry.last_call_s, 1), timeout_s=timeout)
            self.finish_job(entry, f"its client made no call for {timeout:g} s during its API "
                            "wait", cancel=True, error=True)

    def job_status(self, entry: JobEntry) -> agent_pb2.JobStatus:
        job = entry.job
        # A finished job holds no KV (its worker got an Abort), whatever the core last knew.
        kv = (common_pb2.KV_STATE_NONE if entry.finished_unix_s is not None
              else wire.kv_state_to_proto(job.kv_state))
        status = agent_pb2.JobStatus(
            job_id=job.job_id, category=job.category, state=wire.job_state_to_proto(job.state),
            level=job.level, kv_state=kv,
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


    def worker_draining(self, worker_id: int, reason: str) -> None:
        """The worker asked to leave (its Drain message): from now on the planner leaves it
        out, the jobs whose KV waits there are moved off it, and it is answered with
        Shutdown(drain): it finishes its running segments (their tokens still stream) and
        closes the stream. Its plans sent before stay ahead of the Shutdown on the stream."""
        entry = self.registry.workers.get(worker_id)
        if entry is None or entry.draining is not None:
            return
        entry.draining = reason or "no reason given"
        moved = self.drop_kept_kv(worker_id)
        log.info("worker draining", worker_id=worker_id, worker_name=entry.name,
                 reason=entry.draining,
                 running_segments=len(self.scheduler.running.get(worker_id, {})),
                 jobs_moved_off=len(moved), workers_taking_work=len(self.registry.views()),
                 workers_draining=len(self.registry.draining()))
        entry.outbound.put_nowait(worker_pb2.ControlMessage(shutdown=worker_pb2.Shutdown(
            reason=f"draining: {entry.draining}", drain=True)))
        self.mark_dirty()

    def drop_kept_kv(self, worker_id: int) -> list[str]:
        """Jobs whose KV waits on a draining worker (paused in an API wait, or preempted
        there) lose it there: their next admission goes to another worker, which recomputes
        the context. The planner calls it before each plan, since segments that end on the
        worker while it drains leave KV behind again."""
        moved = self.scheduler.drop_kept_kv(worker_id, self.now())
        for job_id in moved:
            self.abort_on_worker(self.scheduler.jobs[job_id], "worker draining")
        return moved

    def worker_lost(self, worker_id: int, expected: bool = False) -> None:
        """The worker's stream closed: all KV it held is gone. Running segments are re-queued
        as preempted with a discard (the tokens already streamed count as generated), kept
        jobs become discarded so they may be placed anywhere (`Scheduler.worker_lost`)."""
        entry = self.registry.workers.pop(worker_id, None)
        if entry is None:
            return
        entry.outbound.put_nowait(None)
        generated = {}
        running = self.scheduler.running.get(worker_id, {})
        cut = len(running)  # segments it was running: queued again
        for job_id in running:
            seg = self.registry.jobs[job_id].segment
            if seg:  # tokens already streamed count as generated: nothing is sent twice
                generated[job_id] = seg.next_index - seg.admission_base
                seg.generated += generated[job_id]
        self.scheduler.worker_lost(worker_id, self.now(), generated)
        for job_entry in self.registry.jobs.values():  # its histories are gone with it
            if job_entry.history_worker == worker_id:
                job_entry.history_worker = None
        if entry.draining is not None and not cut:
            log.info("worker drained", worker_id=worker_id, worker_name=entry.name,
                     workers_taking_work=len(self.registry.views()))
        elif entry.draining is not None:  # its drain timed out, or it died meanwhile
            log.warning("worker left before its drain finished, segments queued again",
                        worker_id=worker_id, worker_name=entry.name, segments=cut)
        else:
            (log.info if expected else log.warning)(
                "worker disconnected" if expected else "worker lost",
                worker_id=worker_id, worker_name=entry.name)
        self.mark_dirty()
