"""The scheduling core: job registry, events in, batch plans out.

Pure: no I/O and no clock — every call carries `now`. The simulator and the control-plane
service drive the very same object: they report events (arrival, segment submitted, segment
ended, preempted) and ask `build_plan(now, views)` for what the workers should do next.

A policy is a discipline (who goes first) plus a KV policy (what happens during API waits),
see `policies.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from astraea.plan import (
    Admit,
    AdmitDecision,
    Evict,
    JobState,
    KvAction,
    KvDecision,
    KvState,
    Pause,
    PlanAction,
    Preempt,
    WorkerView,
    decision_key,
)
from astraea.profile import HardwareProfile
from control_plane.core.admission import NewJobGate
from control_plane.core.config import SchedulerConfig
from control_plane.core.discipline import Discipline
from control_plane.core.estimates import ServiceTimeEstimator
from control_plane.core.job import Job
from control_plane.core.kv_policy import KvPolicy
from control_plane.core.token_cost import TokenCostModel

NO_LIMIT = 1 << 62


class SchedulerError(ValueError):
    """An event that does not fit the job's state (unknown id, wrong state, bad numbers)."""


class Scheduler:
    def __init__(
        self,
        discipline: Discipline,
        kv_policy: KvPolicy,
        profile: HardwareProfile,
        estimator: ServiceTimeEstimator,
        config: SchedulerConfig | None = None,
        on_decision: Callable[[KvDecision, Job], None] | None = None,
        on_admit: Callable[[AdmitDecision, Job], None] | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.discipline = discipline
        self.kv_policy = kv_policy
        self.profile = profile
        self.estimator = estimator
        self.token_cost = TokenCostModel.from_profile(profile, self.config.nominal_batch_size)
        self.jobs: dict[str, Job] = {}
        self.running: dict[int, dict[str, Job]] = {}
        self.paused: dict[int, dict[str, Job]] = {}  # API_WAIT with KV resident on the worker
        self.resident_ready: dict[int, dict[str, Job]] = {}  # READY with KV resident, not running
        self.new_jobs = NewJobGate(discipline.new_job_kv_share, self.config.kv.watermark,
                                   estimator, self._copies_free)
        self.decision_counts: Counter[str] = Counter()
        self.on_decision = on_decision  # every KV decision, with its inputs (for traces)
        self.on_admit = on_admit  # every admission, with the queue and score it won with
        self.recent_queueing_delay_s = 0.0  # EWMA of the wait before admission
        # After an empty plan that only memory could unblock: per worker (free blocks, the
        # fewest free blocks it stays empty with, the rest of the view). None: unknown.
        self._blocked: dict[int, tuple] | None = None

    # --- events -------------------------------------------------------------------------
    def job_arrived(self, job_id: str, now: float, category: str = "unknown") -> Job:
        if job_id in self.jobs:
            raise SchedulerError(f"duplicate job id {job_id!r}")
        self._blocked = None
        job = Job(job_id=job_id, arrival_s=now, category=category)
        self.jobs[job_id] = job
        return job

    def job_restored(self, job_id: str, arrival_s: float, category: str, segment_index: int,
                     context_tokens: int, api_wait: bool, now: float) -> Job:
        """A job recovered from durable state after a restart: its KV died with the old
        process (DISCARDED: the next admission recomputes `context_tokens`), it is on no
        worker and in no queue. `api_wait`: it waits for its tool (the wait counts from
        `now`); otherwise it waits, like a new job, for its client's next segment."""
        if job_id in self.jobs:
            raise SchedulerError(f"duplicate job id {job_id!r}")
        if segment_index < 0 or context_tokens < 0:
            raise SchedulerError(f"job {job_id}: negative segment index or context")
        self._blocked = None
        job = Job(job_id=job_id, arrival_s=arrival_s, category=category,
                  segment_index=segment_index, context_tokens=context_tokens,
                  kv_state=KvState.DISCARDED if context_tokens else KvState.NONE)
        if api_wait:
            job.state, job.api_start_s = JobState.API_WAIT, now
        self.jobs[job_id] = job
        return job

    def segment_submitted(self, job_id: str, now: float, new_tokens: int,
                          next_tool_category: str | None = None,
                          expected_output_tokens: int | None = None,
                          expected_api_s: float | None = None) -> Job:
        """A segment is ready: the job's first, or the one after its tool returned. The
        client's expectations, if any, replace the estimates of a `HintedEstimator`."""
        job = self._job(job_id)
        if new_tokens < 0:
            raise SchedulerError(f"job {job_id}: negative token count {new_tokens}")
        if job.state is JobState.API_WAIT:
            self.estimator.observe_api(job.next_tool_category or "unknown", now - job.api_start_s)
            self.kv_policy.forget(job)
            if job.worker_id is not None:
                self.paused.get(job.worker_id, {}).pop(job_id, None)
                if job.kv_state is KvState.RESIDENT:
                    self.resident_ready.setdefault(job.worker_id, {})[job_id] = job
        elif job.state is not JobState.ARRIVED:
            raise SchedulerError(
                f"job {job_id}: cannot submit a segment while {job.state.value}")
        job.mark_ready(now, new_tokens)
        job.next_tool_category = next_tool_category
        job.hinted_output_tokens, job.hinted_api_s = expected_output_tokens, expected_api_s
        self._enqueue(job, now)
        return job

    def segment_ended(self, job_id: str, now: float, generated_tokens: int,
                      prefill_tokens: int, calls_tool: bool, tool_category: str | None,
                      view: WorkerView) -> Pause | None:
        """The worker finished a segment; for a tool call, decide the KV action now."""
        job = self._job(job_id)
        if job.state is not JobState.RUNNING or job.worker_id != view.worker_id:
            raise SchedulerError(f"job {job_id} is not running on worker {view.worker_id}")
        run_s = now - (job.running_since_s if job.running_since_s is not None else now)
        job.running_since_s = None
        decode_context = job.context_tokens + job.pending_tokens
        job.segment_cost += self.token_cost.cost(prefill_tokens, generated_tokens, decode_context)
        self.estimator.observe_output(job, generated_tokens)
        self.discipline.on_segment_end(job, now, calls_tool, job.segment_cost, run_s)
        job.mark_segment_end(now, generated_tokens, calls_tool)
        self.running[view.worker_id].pop(job_id, None)
        if not calls_tool:
            self.new_jobs.finished(job)
            return None
        job.next_tool_category = tool_category
        decision = self.kv_policy.on_api_yield(job, now, view)
        self._record(decision, job)
        self._apply_kv(job, decision.action)
        self._release_in_view(view, job, decision.action)
        return Pause(job_id, view.worker_id, decision.action)

    def segment_preempted(self, job_id: str, now: float, generated_tokens: int,
                          action: KvAction = KvAction.DISCARD) -> None:
        """The worker stopped a running segment (out of memory, or a Preempt action)."""
        job = self._job(job_id)
        if job.state is not JobState.RUNNING:
            raise SchedulerError(f"job {job_id} is not running")
        self.running[job.worker_id].pop(job_id, None)
        job.preempting = False
        self.discipline.on_preempted(job, now)
        job.running_since_s = None
        job.mark_preempted(now, generated_tokens)
        job.kv_state = KvState.SWAPPED if action is KvAction.SWAP else KvState.DISCARDED
        self.decision_counts[decision_key(action.value, "preemption")] += 1
        self._enqueue(job, now)

    def job_cancelled(self, job_id: str, now: float) -> Job:
        job = self._job(job_id)
        if job.state is JobState.READY:
            self.discipline.remove(job)
        if job.worker_id is not None:
            self.running.get(job.worker_id, {}).pop(job_id, None)
            self.paused.get(job.worker_id, {}).pop(job_id, None)
            self.resident_ready.get(job.worker_id, {}).pop(job_id, None)
        self.new_jobs.finished(job)
        self.kv_policy.forget(job)
        job.state = JobState.FINISHED
        job.finished_s = now
        return job

    def worker_lost(self, worker_id: int, now: float, generated: dict[str, int]) -> list[str]:
        """A worker is gone, and all the KV it held with it. Its running segments are
        re-queued as preempted with their KV discarded (`generated[job_id]` tokens they had
        produced are kept in the history); jobs whose KV it kept, paused or ready, become
        discarded so they may be placed anywhere. Returns the affected job ids."""
        self._blocked = None
        affected = []
        for job in list(self.running.get(worker_id, {}).values()):
            self.segment_preempted(job.job_id, now, generated.get(job.job_id, 0), KvAction.DISCARD)
            affected.append(job.job_id)
        affected += [j for j in self.drop_kept_kv(worker_id, now) if j not in affected]
        for table in (self.running, self.paused, self.resident_ready):
            table.pop(worker_id, None)
        self.new_jobs.worker_lost(worker_id)
        return affected

    def drop_kept_kv(self, worker_id: int, now: float) -> list[str]:
        """Jobs whose KV the worker keeps while they do not run (paused in an API wait, or
        ready; resident or swapped) lose it: they become discarded, so their next admission
        may go to any worker. For a worker that is going away (lost, or draining: its running
        segments go on). Returns those job ids; the caller frees their KV on the worker."""
        self._blocked = None  # queued jobs' needs change
        moved = []
        for job in self.jobs.values():
            if (job.worker_id == worker_id and job.state in (JobState.API_WAIT, JobState.READY)
                    and job.kv_state in (KvState.RESIDENT, KvState.SWAPPED)):
                self.kv_policy.forget(job)
                job.kv_state = KvState.DISCARDED
                self.paused.get(worker_id, {}).pop(job.job_id, None)
                self.resident_ready.get(worker_id, {}).pop(job.job_id, None)
                if job.state is JobState.READY:  # its needs changed: queue it again
                    self.discipline.remove(job)
                    self._enqueue(job, now)
                moved.append(job.job_id)
        return moved

    def forget_finished(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state is JobState.FINISHED:
            del self.jobs[job_id]

    # --- planning -----------------------------------------------------------------------
    def build_plan(self, now: float, views: dict[int, WorkerView]) -> list[PlanAction]:
        """Decide what each worker does next. `views` are updated in place as admissions,
        evictions and preemptions are planned, so the caller sees the planned state."""
        actions: list[PlanAction] = []
        cap = self.config.max_running_per_worker
        for w, view in views.items():
            if cap:
                view.max_seqs = min(view.max_seqs, cap)
            self.running.setdefault(w, {})
            paused = self.paused.setdefault(w, {})
            if paused:
                for d in self.kv_policy.revisit(now, list(paused.values()), view):
                    actions.append(self._evict(self.jobs[d.job_id], d, view, now))
        for d in self.discipline.control(now, views):
            job = self.jobs.get(d.job_id)
            # Only KV that is preserved in an API wait can be evicted by a control loop.
            if job is not None and d.job_id in self.paused.get(job.worker_id, {}):
                actions.append(self._evict(job, d, views[job.worker_id], now))
        # Until room has been made on every worker, no candidate is filtered out for size:
        # the most important blocked job must reach `_make_room`.
        room = [NO_LIMIT]
        room_tried: set[int] = set()
        misses = 0
        # Whether an empty plan stays empty while only time passes and memory shrinks, and
        # per worker the free blocks below which making room would reclaim (see `may_act`).
        static = self.discipline.static_order and not self.discipline.preemptive
        floors: dict[int, int] = {}
        self.new_jobs.new_plan()
        # Workers where a candidate did not fit: a job not started yet does not take memory
        # there before it (`Discipline.new_jobs_wait`), so as not to stretch every job under way.
        held: set[int] = set()
        for job in self.discipline.candidates(now, room):
            view, need = self._place(job, views)
            if (view is not None and view.running_seqs < view.max_seqs
                    and (job.worker_id is not None or view.worker_id not in held)
                    and self.new_jobs.fits(job, now, view, need, self.predicted_compute_s)):
                if not self._fits(view, need) and view.worker_id not in room_tried:
                    # Room is made for the most important blocked job of each worker only.
                    room_tried.add(view.worker_id)
                    if static:
                        static = self._note_floor(view, need, floors)
                    actions.extend(self._make_room(job, now, view, need))
                    if len(room_tried) == len(views):
                        room[0] = self._most_room(views)
                if self._fits(view, need):
                    actions.append(self._admit(job, now, view, need))
                    if room[0] != NO_LIMIT:
                        room[0] = self._most_room(views)
                    misses = 0
                    continue
                if self.discipline.new_jobs_wait:
                    held.add(view.worker_id)
            if self.discipline.blocking or (self.discipline.reserving
                                            and self._copies_free(view, need)):
                break
            misses += 1
            if (misses >= self.config.max_skipped_candidates
                    or (room[0] != NO_LIMIT and room[0] <= 0)
                    or all(v.running_seqs >= v.max_seqs for v in views.values())):
                break  # nothing more can start in this build
        self._blocked = None
        if static and not actions:
            one = len(views) == 1  # with several workers, placement follows their memory
            self._blocked = {w: (v.free_blocks, floors.get(w, 0) if one else v.free_blocks,
                                 (v.running_seqs, v.host_free_blocks, v.swapping_out_blocks))
                             for w, v in views.items()}
        return actions

    def _copies_free(self, view: WorkerView | None, need: int) -> bool:
        # `need` blocks come by free copies: a reserve holds, the new-job gate passes (design.md).
        return view is not None and self.kv_policy.copy_is_free(need * view.block_size, view)

    def _note_floor(self, view: WorkerView, need: int, floors: dict[int, int]) -> bool:
        """Before room is made for a blocked job: note the free blocks below which the KV
        policy would be asked to reclaim from paused jobs (`_make_room`'s shortfall turns
        positive). False if making room may act now (reclaim, deadlock breaker)."""
        if view.running_seqs == 0 and not view.swapping_out_blocks:
            return False
        if self.paused.get(view.worker_id):
            floor = need + int(self.config.kv.watermark * view.total_blocks) - view.swapping_out_blocks
            if view.free_blocks < floor:
                return False
            floors[view.worker_id] = floor
        return True

    def may_act(self, now: float, views: dict[int, WorkerView] | None = None) -> bool:
        """Whether `build_plan` may return an action now: a job waits for admission, or the KV
        policy may revisit a paused job. False means the plan is certainly empty, so a caller
        may skip it (the simulator does, after engine steps that changed nothing, and the
        control plane's planner after reports that changed nothing it could act on).

        With the workers' `views`, also False while the last plan was empty and nothing has
        happened since but time passing and memory shrinking within `blocked_floor` (engine
        steps that only decode): for a discipline with a static order no waiting job can
        fit then, and making room does nothing."""
        if not self.discipline.control_idle(now):
            return True
        if any(self.paused.values()) and not self.kv_policy.revisit_idle(now):
            return True
        if not self.discipline.has_waiting():
            return False
        return views is None or not self._still_blocked(views)

    def quiet_until(self, now: float, until: Callable[[], float],
                    views: Callable[[], dict[int, WorkerView]], stepping: int) -> tuple[float, float]:
        """For a caller that skips plans (the simulator): `(T, S)` such that every plan at an
        instant in (now, T) is certainly empty while nothing happens but engine steps on
        worker `stepping` that only decode or prefill, each lasting at most S seconds, with
        memory shrinking no lower than `blocked_floor`. T = now: a plan may act. `until()`
        bounds T (the next event) and `views()` gives the workers' views: each is asked
        only if needed."""
        inf = float("inf")
        if not self.may_act(now):
            return until(), inf
        if not self.discipline.control_idle(now):
            return now, 0.0
        queued = self.discipline.has_waiting()
        if queued and self._blocked is None:
            return now, 0.0
        shown = views()
        if queued and not self._still_blocked(shown):
            return now, 0.0
        limit, longest = until(), inf
        if not self.kv_policy.revisit_idle(now):
            for w, paused in self.paused.items():
                if paused and w in shown:
                    t, step = self.kv_policy.revisit_quiet(now, limit, list(paused.values()),
                                                           shown[w], w == stepping)
                    limit, longest = min(limit, t), min(longest, step)
                    if limit <= now:
                        return now, 0.0
        return limit, longest

    def plans_skipped(self, now: float, views: Callable[[], dict[int, WorkerView]]) -> None:
        """A caller skipped the plans `quiet_until` proved empty, the last at `now` with the
        workers' `views` (built if needed): keep what those plans would have left behind (a
        KV policy's per-step state)."""
        if self.kv_policy.revisit_idle(now) or not any(self.paused.values()):
            return
        shown = views()
        for w, paused in self.paused.items():
            if paused and w in shown:
                self.kv_policy.revisit_skipped(shown[w])

    @property
    def blocked(self) -> bool:
        """The last plan was empty and waits for memory (`may_act` needs views to tell)."""
        return self._blocked is not None

    def _still_blocked(self, views: dict[int, WorkerView]) -> bool:
        blocked = self._blocked
        if blocked is None or blocked.keys() != views.keys():
            return False
        for w, v in views.items():
            free, floor, rest = blocked[w]
            if not floor <= v.free_blocks <= free or rest != (
                    v.running_seqs, v.host_free_blocks, v.swapping_out_blocks):
                return False
        return True

    def blocked_floor(self, worker_id: int) -> int | None:
        """While the last plan stays empty (`may_act`): the fewest free blocks the worker may
        get down to with the plan still empty. None when no plan is known to be empty."""
        entry = self._blocked.get(worker_id) if self._blocked is not None else None
        return entry[1] if entry is not None else None

    def _fits(self, view: WorkerView, need: int) -> bool:
        return need <= 0 or need <= self._admissible_blocks(view)

    def _most_room(self, views: dict[int, WorkerView]) -> int:
        """The most blocks any worker with a free sequence slot can still give."""
        return max((self._admissible_blocks(v) for v in views.values()
                    if v.running_seqs < v.max_seqs), default=0)

    def next_timer(self) -> float | None:
        """When the core wants `build_plan` called even if no event arrives (e.g. a TTL)."""
        due = [t for t in (self.kv_policy.next_deadline(), self.discipline.next_deadline())
               if t is not None]
        return min(due) if due else None

    def queue_lengths(self) -> list[int]:
        return self.discipline.queue_lengths()

    # --- internals ----------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        """The job an event is about; every event may unblock a plan."""
        job = self.jobs.get(job_id)
        if job is None:
            raise SchedulerError(f"unknown job id {job_id!r}")
        self._blocked = None
        return job

    def _record(self, decision: KvDecision, job: Job, cause: str = "api_wait") -> None:
        self.decision_counts[decision_key(decision.action.value, cause)] += 1
        if self.on_decision is not None:
            self.on_decision(decision, job)

    def _apply_kv(self, job: Job, action: KvAction) -> None:
        job.apply_kv_action(action)
        if action is KvAction.PRESERVE and job.state is JobState.API_WAIT:
            self.paused.setdefault(job.worker_id, {})[job.job_id] = job
        else:
            self.paused.get(job.worker_id, {}).pop(job.job_id, None)
            # The KV left the GPU, whoever decided it (the policy, a reclaim, the deadlock
            # breaker): the policy must drop what it keeps about the job's KV. Otherwise
            # InferCept, which keeps preserved jobs it wants to swap, revisited a job the
            # deadlock breaker had discarded and planned a second Evict for KV the worker no
            # longer held (the engine refused it: "no resident KV").
            self.kv_policy.forget(job)

    def _need_blocks(self, job: Job, block_size: int, view: WorkerView | None = None) -> int:
        """Blocks the job's next admission takes from the worker's free memory. A resident
        job already holds the blocks of its KV positions (not of its whole history: the last
        sampled token has no KV yet) — exactly what `view` reports where it can tell."""
        total = -(-(job.context_tokens + job.pending_tokens) // block_size)
        if job.kv_state is KvState.RESIDENT:
            held = (view.job_blocks(job.job_id, job.kv_positions) if view is not None
                    else -(-job.kv_positions // block_size))
            return total - held
        return total

    def predicted_compute_s(self, job: Job) -> float:
        """T of HRRN: the segment's compute time alone on the engine."""
        prefill = job.tokens_to_prefill
        context = job.context_tokens + job.pending_tokens
        out = self.estimator.output_tokens(job)
        prior = job.context_tokens if prefill == job.pending_tokens else 0
        return self.profile.prefill_time_s(prefill, prior) + out * self.profile.step_time_s(1, context)

    def _enqueue(self, job: Job, now: float) -> None:
        need = self._need_blocks(job, self.profile.block_size)
        self.discipline.add(job, now, self.predicted_compute_s(job), need)

    def _admissible_blocks(self, view: WorkerView) -> int:
        reserve = int(self.config.kv.watermark * view.total_blocks)
        return view.free_blocks - reserve

    def _place(self, job: Job, views: dict[int, WorkerView]) -> tuple[WorkerView | None, int]:
        """A job whose KV is on a worker stays there; otherwise prefer the worker whose prefix
        cache may hold it, then the one with the most free memory."""
        if job.kv_state in (KvState.RESIDENT, KvState.SWAPPED):
            view = views.get(job.worker_id)
            return (view, self._need_blocks(job, view.block_size, view)) if view else (None, 0)
        if len(views) == 1:
            view = next(iter(views.values()))
            return view, self._need_blocks(job, view.block_size)
        best = None
        for view in views.values():
            if view.running_seqs >= view.max_seqs:
                continue
            key = (view.worker_id == job.worker_id, self._admissible_blocks(view), -view.running_seqs)
            if best is None or key > best[0]:
                best = (key, view)
        if best is None:
            return None, 0
        view = best[1]
        need = self._need_blocks(job, view.block_size)
        if job.worker_id is not None and view.worker_id == job.worker_id and need > self._admissible_blocks(view):
            # Affinity only helps if it fits; fall back to the roomiest worker.
            view = max(views.values(), key=lambda v: (self._admissible_blocks(v), -v.running_seqs))
        return view, need

    def _admit(self, job: Job, now: float, view: WorkerView, need: int) -> Admit:
        if self.on_admit is not None:  # for traces: the queue and score the job was admitted with
            self.on_admit(AdmitDecision(job.job_id, view.worker_id, self.discipline.level_of(job),
                                        self.discipline.admission_score(job, now)), job)
        self.discipline.remove(job)
        self.resident_ready.get(view.worker_id, {}).pop(job.job_id, None)
        self.new_jobs.admitted(job, view.worker_id)
        swap_in = job.kv_state is KvState.SWAPPED
        wait = job.waiting_now(now) - job.waiting_s
        self.recent_queueing_delay_s += 0.05 * (wait - self.recent_queueing_delay_s)
        job.mark_running(now, view.worker_id)
        job.running_since_s = now
        self.running.setdefault(view.worker_id, {})[job.job_id] = job
        view.free_blocks -= need
        view.running_seqs += 1
        view.running_context_tokens += job.context_tokens + job.pending_tokens
        # A swap-in frees its host blocks only when the copy lands (the worker reports it).
        return Admit(job.job_id, view.worker_id, job.pending_tokens, job.context_tokens, swap_in,
                     self.discipline.engine_priority(job, now, self.predicted_compute_s(job)))

    @staticmethod
    def _release_in_view(view: WorkerView, job: Job, action: KvAction) -> None:
        """What swapping out or dropping the job's KV will do to the worker's memory, in the
        view at once: decisions taken before the worker's next report (several segments
        ending together, a plan) see the memory already given back."""
        if action is KvAction.PRESERVE:
            return
        blocks = view.job_blocks(job.job_id, job.kv_positions)
        if action is KvAction.SWAP:
            view.swapping_out_blocks += blocks
            view.host_free_blocks -= blocks
        else:
            view.free_blocks += blocks

    def _evict(self, job: Job, decision: KvDecision, view: WorkerView, now: float,
               cause: str = "api_wait") -> Evict:
        """`cause`: "api_wait" for a decision about the wait itself (a policy's revisit, a
        control loop); "reclaim" when a ready job takes the memory back (make room, deadlock)."""
        self._record(decision, job, cause)
        self._release_in_view(view, job, decision.action)
        self._apply_kv(job, decision.action)
        self.resident_ready.get(view.worker_id, {}).pop(job.job_id, None)
        if job.state is JobState.READY:  # a ready job's needs change with its KV state
            self.discipline.remove(job)
            self.discipline.add(job, now, self.predicted_compute_s(job),
                                self._need_blocks(job, view.block_size))
        return Evict(job.job_id, view.worker_id, decision.action)

    def _make_room(self, job: Job, now: float, view: WorkerView, need: int) -> list[PlanAction]:
        actions: list[PlanAction] = []
        short = need - self._admissible_blocks(view) - view.swapping_out_blocks
        paused = self.paused.get(view.worker_id)
        if short > 0 and paused:
            for d in self.kv_policy.reclaim(now, list(paused.values()), view, short):
                actions.append(self._evict(self.jobs[d.job_id], d, view, now, "reclaim"))
        if self.discipline.preemptive and not self._fits(view, need):
            actions.extend(self._preempt_for(job, now, view, need))
        if view.running_seqs == 0 and not self._fits(view, need) and not view.swapping_out_blocks:
            actions.extend(self._break_deadlock(job, now, view, need))
        return actions

    def _break_deadlock(self, job: Job, now: float, view: WorkerView, need: int) -> list[Evict]:
        """Nothing runs on the worker, nothing is being copied out, and the next job does not
        fit: the memory is held by jobs that are not running (paused, or ready behind this
        one). Nothing would ever change, so drop their KV — paused jobs first (the longest
        predicted wait first), then ready ones from the lowest priority — until it fits."""
        paused = sorted(self.paused.get(view.worker_id, {}).values(),
                        key=lambda j: -self.estimator.remaining_api_s(j, now) * j.context_tokens)
        ready = sorted((j for j in self.resident_ready.get(view.worker_id, {}).values() if j is not job),
                       key=lambda j: self.discipline.priority_key(j, now), reverse=True)
        out: list[Evict] = []
        for victim in paused + ready:
            if self._fits(view, need):
                break
            decision = KvDecision(victim.job_id, KvAction.DISCARD,
                                  "deadlock breaker: worker idle and the next job cannot fit",
                                  {"blocks_needed": need, "free_blocks": view.free_blocks})
            out.append(self._evict(victim, decision, view, now, "reclaim"))
        return out

    def _preempt_for(self, job: Job, now: float, view: WorkerView, need: int) -> list[Preempt]:
        """Preempt running segments of strictly lower priority, lowest first, but only if
        together they free enough for `job` (otherwise preempting helps nobody)."""
        mine = self.discipline.priority_key(job, now)[0]
        victims = []
        for r in self.running.get(view.worker_id, {}).values():
            if r.preempting or (view.preemptible and not view.preemptible(r.job_id)):
                continue
            key = self.discipline.priority_key(r, now)
            if key[0] > mine:
                blocks = view.job_blocks(r.job_id, r.context_tokens + r.pending_tokens)
                victims.append((key, blocks, r))
        short = need - self._admissible_blocks(view) - view.swapping_out_blocks
        if sum(v[1] for v in victims) < short:
            return []
        victims.sort(key=lambda v: v[0], reverse=True)
        out: list[Preempt] = []
        for _, blocks, victim in victims:
            if short <= 0:
                break
            if view.host_free_blocks >= blocks:
                action = KvAction.SWAP
                view.host_free_blocks -= blocks
                view.swapping_out_blocks += blocks
            else:
                action = KvAction.DISCARD
                view.free_blocks += blocks
            short -= blocks
            view.running_seqs -= 1
            view.running_context_tokens -= victim.context_tokens + victim.pending_tokens
            victim.preempting = True
            out.append(Preempt(victim.job_id, view.worker_id, action))
        return out
