"""Discrete-event simulation: the scheduling core driving simulated GPU workers in virtual time.

Events: job arrivals, engine steps ending, API calls returning, swap copies landing, and
timers the core asks for. After the events of an instant, the core plans (only if something
changed) and idle workers start their next step. The core sees exactly what the live control
plane sees: segments submitted, segments ended or preempted, worker memory views.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from astraea.plan import Admit, Evict, Pause, Preempt
from astraea.profile import HardwareProfile
from astraea.tools.sim.metrics import JobRecord, idle_jct_s, summarize
from astraea.tools.sim.oracle import TraceOracle
from astraea.tools.sim.prediction_error import PredictionErrorEstimator
from astraea.workloads.trace import JobTrace
from control_plane.core.config import SchedulerConfig
from control_plane.core.estimates import OnlineJobEstimator, ServiceTimeEstimator
from control_plane.core.policies import build_scheduler
from worker.sim.engine import SimulatedEngine

ARRIVAL, STEP_END, API_RETURN, TRANSFER, WAKE = range(5)


@dataclass
class SimResult:
    policy: str
    records: list[JobRecord]
    makespan_s: float
    wall_s: float
    decision_counts: dict
    peak_kv_utilization: float
    engine_counters: dict
    summary: dict = field(default_factory=dict)


def make_estimator(kind: str, jobs: dict[str, JobTrace]) -> ServiceTimeEstimator:
    if kind == "online":
        return OnlineJobEstimator()
    if kind == "oracle":
        return TraceOracle(jobs)
    raise ValueError(f"unknown predictor {kind!r}: use 'online' or 'oracle' (simulator only)")


class Simulation:
    def __init__(self, jobs: list[JobTrace], profile: HardwareProfile, policy: str,
                 num_workers: int = 1, predictor: str = "online",
                 config: SchedulerConfig | None = None, kv_blocks: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 prediction_error: float = 0.0, error_seed: int = 0,
                 skip_idle_steps: bool = True) -> None:
        if any(j.arrival_s is None for j in jobs):
            raise ValueError("every job needs an arrival time (give a QPS for traces without)")
        if num_workers < 1:
            raise ValueError("num_workers must be at least 1")
        self.profile = profile
        self.policy = policy
        # Skip plans that cannot act and run the engine's quiet decode steps without queueing
        # their ends: the same results, several times faster (off: every step as an event).
        self.skip_idle_steps = skip_idle_steps
        self.trace = {j.job_id: j for j in jobs}
        if len(self.trace) != len(jobs):
            raise ValueError("job ids must be unique")
        self.estimator = make_estimator(predictor, self.trace)
        if prediction_error != 0:
            # σ = 0 leaves the estimator unwrapped: today's results, bit for bit.
            self.estimator = PredictionErrorEstimator(self.estimator, prediction_error,
                                                      error_seed)
        self.sched = build_scheduler(policy, profile, self.estimator, config)
        self.engines = [SimulatedEngine(profile, w, kv_blocks) for w in range(num_workers)]
        self.records = {j.job_id: JobRecord(j.job_id, j.category, j.arrival_s,
                                            api_s=j.api_time_s, output_tokens=j.output_tokens)
                        for j in jobs}
        self.progress = progress
        self._events: list = []
        self._seq = itertools.count()
        self._generated: dict[str, int] = {}  # tokens generated so far in the current segment
        self._seg_start: dict[str, float] = {}
        self._pending_wakes: set[float] = set()
        self._dirty = False
        self._done = 0
        self.now = 0.0
        for j in jobs:
            self._push(j.arrival_s, ARRIVAL, j.job_id)

    def _push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    # --- event handlers -----------------------------------------------------------------
    def _on_arrival(self, job_id: str) -> None:
        job = self.trace[job_id]
        self.sched.job_arrived(job_id, self.now, job.category)
        self._submit(job_id, 0)

    def _submit(self, job_id: str, index: int) -> None:
        trace = self.trace[job_id]
        seg = trace.segments[index]
        hint = seg.tool.category if seg.tool else None
        self.sched.segment_submitted(job_id, self.now, trace.new_tokens_before(index), hint)
        self._generated[job_id] = 0
        self._seg_start[job_id] = self.now
        self._dirty = True

    def _on_step_end(self, w: int) -> None:
        engine = self.engines[w]
        result = engine.finish_step(self.now)
        for job_id in result.first_token:
            if self._generated.get(job_id, 0) == 0:
                self.records[job_id].ttft_s.append(self.now - self._seg_start[job_id])
        for end in result.ended:
            job_id = end.job_id
            job = self.sched.jobs[job_id]
            seg = self.trace[job_id].segments[job.segment_index]
            self._generated[job_id] += end.generated_tokens
            assert self._generated[job_id] == seg.output_tokens, "engine generated the wrong count"
            pause = self.sched.segment_ended(
                job_id, self.now, end.generated_tokens, end.prefill_tokens,
                seg.tool is not None, seg.tool.category if seg.tool else None, engine.view())
            if pause is None:
                engine.release(job_id)
                self._finish(job_id)
            else:
                engine.pause(job_id, pause.action, self.now)
                self._push(self.now + seg.tool.duration_s, API_RETURN, job_id)
        self._dirty = True

    def _finish(self, job_id: str) -> None:
        record = self.records[job_id]
        record.finish_s = self.now
        record.final_context_tokens = self.sched.jobs[job_id].context_tokens
        self.sched.forget_finished(job_id)
        self._generated.pop(job_id, None)
        self._done += 1
        if self.progress and self._done % 500 == 0:
            self.progress(self._done, len(self.records))

    def _on_api_return(self, job_id: str) -> None:
        self._submit(job_id, self.sched.jobs[job_id].segment_index)

    # --- planning -----------------------------------------------------------------------
    def _plan(self) -> None:
        if not self.skip_idle_steps or self._may_act(self.now):
            self._apply_plan()
        timer = self.sched.next_timer()
        if timer is not None and timer > self.now and timer not in self._pending_wakes:
            self._pending_wakes.add(timer)
            self._push(timer, WAKE, None)

    def _views(self) -> dict:
        return {e.worker_id: e.view() for e in self.engines}

    def _may_act(self, now: float) -> bool:
        # The workers' views are built only when the core needs them to tell.
        if not self.sched.may_act(now):
            return False
        return not self.sched.blocked or self.sched.may_act(now, self._views())

    def _apply_plan(self) -> None:
        views = self._views()
        for action in self.sched.build_plan(self.now, views):
            engine = self.engines[action.worker_id]
            if isinstance(action, Admit):
                job = self.sched.jobs[action.job_id]
                seg = self.trace[action.job_id].segments[job.segment_index]
                engine.admit(action.job_id, action.new_tokens, action.context_tokens,
                             seg.output_tokens - self._generated[action.job_id],
                             action.swap_in, self.now, action.priority)
            elif isinstance(action, (Pause, Evict)):
                engine.evict(action.job_id, action.action, self.now)
            elif isinstance(action, Preempt):
                generated, taken = engine.preempt(action.job_id, action.action, self.now)
                self._generated[action.job_id] += generated
                self.sched.segment_preempted(action.job_id, self.now, generated, taken)

    def _start_idle_workers(self) -> None:
        for engine in self.engines:
            if engine.busy:
                continue
            if engine.has_work(self.now):
                start = self.now
                if self.skip_idle_steps and engine.may_run_quiet(start):
                    # Until the planner could act: run the steps that change nothing visible
                    # without queueing their ends (and, while a blocked plan waits for
                    # memory, none that shrinks it past its floor).
                    until, longest = self.sched.quiet_until(start, self._quiet_until,
                                                            self._views, engine.worker_id)
                    if until > start:
                        start = engine.run_quiet_steps(
                            start, until, self.sched.blocked_floor(engine.worker_id), longest)
                        if start > self.now:
                            self.sched.plans_skipped(start, self._views)
                duration, result = engine.start_step(start)
                for job_id, generated in result.preempted:
                    self._generated[job_id] += generated
                    self.sched.segment_preempted(job_id, self.now, generated)
                    self._dirty = True
                if duration > 0:
                    self._push(start + duration, STEP_END, engine.worker_id)
            else:
                ready = engine.next_ready_s(self.now)
                if ready is not None and ready not in self._pending_wakes:
                    self._pending_wakes.add(ready)
                    self._push(ready, WAKE, None)
            nxt = engine.next_transfer_s()
            if nxt is not None and nxt not in self._pending_wakes:
                self._pending_wakes.add(nxt)
                self._push(nxt, TRANSFER, engine.worker_id)

    def _quiet_until(self) -> float:
        """The next instant anything may happen: the next queued event, or a host copy or a
        swap-in landing on any engine (their events are queued only after steps start)."""
        times = [self._events[0][0]] if self._events else []
        for e in self.engines:
            times.extend(t for t in (e.next_transfer_s(), e.next_ready_s(self.now))
                         if t is not None)
        return min(times, default=float("inf"))

    # --- main loop ----------------------------------------------------------------------
    def run(self) -> SimResult:
        started = time.perf_counter()
        events = self._events
        while events:
            t, _, kind, payload = heapq.heappop(events)
            self.now = t
            if kind == ARRIVAL:
                self._on_arrival(payload)
            elif kind == STEP_END:
                self._on_step_end(payload)
            elif kind == API_RETURN:
                self._on_api_return(payload)
            elif kind == TRANSFER:
                self._pending_wakes.discard(t)
                for e in self.engines:
                    e.complete_transfers(t)
                self._dirty = True
            else:
                self._pending_wakes.discard(t)
                self._dirty = True
            if events and events[0][0] == t:
                continue  # take every event of this instant before planning
            if self._dirty:
                self._dirty = False
                self._plan()
            self._start_idle_workers()
        wall = time.perf_counter() - started
        return self._result(wall)

    def _result(self, wall: float) -> SimResult:
        records = list(self.records.values())
        for r in records:
            r.idle_jct_s = idle_jct_s(self.trace[r.job_id], self.profile)
        makespan = max((r.finish_s for r in records if r.finish_s == r.finish_s), default=0.0)
        total = sum(e.pool.total for e in self.engines)
        peak = max(e.peak_used_blocks / e.pool.total for e in self.engines)
        counters = {
            k: sum(getattr(e, k) for e in self.engines)
            for k in ("tokens_prefilled", "tokens_decoded", "tokens_recomputed",
                      "tokens_swapped_out", "tokens_swapped_in", "prefix_hit_tokens", "preemptions")
        }
        counters["kv_blocks_total"] = total
        res = SimResult(self.policy, records, makespan, wall, dict(self.sched.decision_counts),
                        peak, counters)
        res.summary = summarize(records, makespan)
        return res
